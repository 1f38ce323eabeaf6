"""A Python client of the HTTP API of one mounted resource.

::

    from flask_multiprocess_controller.client import Client

    with Client("http://127.0.0.1:5000", "/reports") as reports:
        uuid = reports.submit(customer=7)
        task = reports.wait(uuid, progress=True)     # a tqdm bar driven by the task's percent
        print(task["status"], task["result"])

It speaks the README's HTTP table and nothing else, so it runs in any process: a script, a
cron job, another service. It needs ``requests`` (and ``tqdm`` for progress bars), the
``client`` extra: ``pip install 'flask-multiprocess-controller[client]'``; both are imported
when first needed, and it never creates an app, a controller or a process.

Each error answer raises a :class:`ClientError` subclass named after its status code. A
``429`` (queue full: nothing was queued) and a ``503`` (store unreachable) are retried, after
the ``Retry-After`` the server sent, up to ``max_retries`` times.

A submission is safe to send again: :meth:`Client.submit` and :meth:`Client.submit_many` send an
``Idempotency-Key`` (a fresh one per call unless the caller gives one), and when the answer is lost
(the connection broke, the request timed out, a gateway answered 502, 503 or 504) they send the same
request again with the same key, up to ``max_retries`` times with a growing delay: the server answers
with the task the first request made, and never makes a second one.

A task is named by its uuid, or by a prefix of 8 or more of its hex digits (the short id the dashboard shows)
that begins the uuid of one task only: the client asks the extension's task API which tasks it names
(``GET <prefix>/api/tasks?uuid_prefix=``), and raises :class:`NotFound` when none, :class:`AmbiguousPrefix`
(listing some) when several.

Redirects are followed only within the origin (scheme, host and port) of the request: a redirect
to another origin raises :class:`RedirectRefused`, so that neither the credentials (``auth=``,
``headers=``) nor a body is ever sent where the server pointed.

.. versionadded:: 0.3
"""
from __future__ import annotations

import email.utils
import time
import urllib.parse
import uuid as uuid_module
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

if TYPE_CHECKING:
    import requests
    from tqdm import tqdm

#: Seconds one long-poll of :meth:`Client.wait` asks for: below the server's ``max_wait``
#: default of 25 s, so that the server answers before anything between gives up on the request.
WAIT_CHUNK = 20.0
#: Seconds between two reads of a task while :meth:`Client.wait` shows a progress bar
#: (a long-poll answers only when the task ends; the bar needs the percentages in between).
PROGRESS_INTERVAL = 0.5
#: Seconds a request may take (a long-poll: this beyond its wait).
DEFAULT_TIMEOUT = 30.0
#: Times a 429 or 503 answer is retried before its error is raised.
DEFAULT_MAX_RETRIES = 3
#: Seconds a retry waits at most: a longer ``Retry-After`` raises the error at once.
MAX_RETRY_DELAY = 60.0
#: Seconds a retry waits when the answer names no ``Retry-After``.
DEFAULT_RETRY_DELAY = 1.0
#: Seconds before the first retry of a submission whose answer was lost; each further one doubles it
#: (up to ``max_retry_delay``).
RETRY_BACKOFF = 0.5
#: Redirects within the request's origin followed at most.
MAX_REDIRECTS = 5
#: The header that makes a submission safe to send again.
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Hex digits a uuid prefix needs at least (the server's rule, checked here to ask only about prefixes).
MIN_PREFIX_DIGITS = 8
#: Tasks an :class:`AmbiguousPrefix` lists at most.
PREFIX_CANDIDATES = 5
#: States a task never leaves.
TERMINAL_STATES = frozenset({"succeeded", "failed", "stopped", "timed_out", "lost"})

_EXTRA = "pip install 'flask-multiprocess-controller[client]'"

Auth = Union[tuple[str, str], Callable[..., Any], None]


# -- errors ----------------------------------------------------------------------------------------


class ClientError(Exception):
    """An error answer of the server, or no answer at all; the base of this module's errors."""

    #: The HTTP status this class stands for (None: any, or no answer).
    code: Optional[int] = None

    def __init__(self, message: str, *, status: Optional[int] = None,
                 response: Optional[requests.Response] = None, retry_after: Optional[float] = None,
                 url: Optional[str] = None) -> None:
        super().__init__(message)
        #: The URL of the request the error answered (None when no request was sent).
        self.url = url
        #: The server's ``message`` (or what went wrong).
        self.message = message
        #: The HTTP status of the answer; None when there was none.
        self.status = status
        #: The answer itself, when there was one.
        self.response = response
        #: Seconds the server asked to wait before retrying (``Retry-After``), if it said.
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status}: {self.message}"


class TransportError(ClientError):
    """No answer: the server could not be reached, or did not answer within the timeout."""


class BadRequest(ClientError):
    """400: invalid JSON, arguments ``execute`` does not take, a bad option or a malformed uuid."""

    code = 400


class Unauthorized(ClientError):
    """401: the app wants credentials (pass ``auth=`` or ``headers=`` to the client)."""

    code = 401


class Forbidden(ClientError):
    """403: the credentials do not allow this."""

    code = 403


class NotFound(ClientError):
    """404: no such task (or no such URL)."""

    code = 404


class MethodNotAllowed(ClientError):
    """405: the resource does not serve this method."""

    code = 405


class Conflict(ClientError):
    """409: the task has already ended."""

    code = 409


class PayloadTooLarge(ClientError):
    """413: the body is over the server's size limit, or holds too many tasks."""

    code = 413


class UnprocessableContent(ClientError):
    """422: the ``Idempotency-Key`` was used before with another body or other options; nothing was queued."""

    code = 422


class AmbiguousPrefix(ClientError):
    """The uuid prefix given begins the uuid of several tasks; ``candidates`` holds some of their task objects,
    newest first. Give more of the uuid. Nothing was sent to the resource."""

    def __init__(self, message: str, candidates: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        #: Task objects of the tasks whose uuid begins with the prefix (some of them).
        self.candidates = candidates


class RedirectRefused(ClientError):
    """The server redirected the request to another origin (scheme, host or port), which the client does not
    follow: the credentials and the body would go there. Also raised after :data:`MAX_REDIRECTS` redirects."""


class QueueFull(ClientError):
    """429: the queue is full and nothing was queued; raised once the retries are spent."""

    code = 429


class ServerError(ClientError):
    """500: the server failed."""

    code = 500


class ServerUnavailable(ClientError):
    """503: the task store is unreachable or the controller shut down; raised once the retries are spent."""

    code = 503


_BY_STATUS: dict[int, type[ClientError]] = {
    cls.code: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, Conflict,
                              PayloadTooLarge, QueueFull, ServerError, ServerUnavailable, UnprocessableContent)
    if cls.code is not None
}

#: Statuses retried after ``Retry-After``.
_RETRIED = frozenset({429, 503})
#: Statuses that may hide a lost answer (a gateway's): a submission with a key is sent again after them.
_LOST = frozenset({502, 503, 504})


# -- the client ------------------------------------------------------------------------------------


class Client:
    """Calls one resource of a server: ``Client("http://host:5000", "/reports")``.

    :param base_url: scheme, host and port (and any path the app is mounted below).
    :param resource: the resource's collection URL, as mounted (``"/reports"``).
        Tasks are addressed by ``?uuid=``, which every mount answers, seed-style or with an item URL.
    :param session: a ``requests.Session`` to send through (its headers, cookies, adapters
        and certificates apply); the client makes its own when None, and closes only that one.
    :param auth: what ``requests`` takes as ``auth=``: a ``(user, password)`` pair or an auth callable.
    :param headers: headers sent with every request (``{"Authorization": "Bearer ..."}``).
    :param prefix: the extension's URL prefix (``MPC_URL_PREFIX``), for :meth:`logs`.
    :param timeout: seconds a request may take (a long-poll: this beyond its wait).
    :param max_retries: times a 429 or 503 answer is retried, and a submission whose answer was lost is
        sent again (0: never).
    :param max_retry_delay: seconds a retry waits at most; a longer ``Retry-After`` raises at once.
    """

    def __init__(self, base_url: str, resource: str, session: Optional[requests.Session] = None,
                 auth: Auth = None, headers: Optional[Mapping[str, str]] = None, *, prefix: str = "/mpc",
                 timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 max_retry_delay: float = MAX_RETRY_DELAY) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {max_retries!r}.")
        requests = _import_requests()
        self.base_url = base_url.rstrip("/")
        self.resource = "/" + resource.strip("/")
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.session = session if session is not None else requests.Session()
        self._owns_session = session is None
        self.auth = auth
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_delay = max_retry_delay

    def __repr__(self) -> str:
        return f"Client({self.base_url!r}, {self.resource!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session, if the client made it."""
        if self._owns_session:
            self.session.close()

    # -- tasks --------------------------------------------------------------------------------

    def submit(self, *, priority: Optional[int] = None, timeout: Optional[float] = None,
               idempotency_key: Optional[str] = None, **arguments: Any) -> str:
        """Queue ``execute(**arguments)``; return the task's uuid.

        ``priority`` (lower runs first) and ``timeout`` (seconds; it can only lower the
        controller's) travel as query options. To pass task arguments of those names, or
        ``idempotency_key``, use :meth:`submit_many`.

        The request carries an ``Idempotency-Key``: ``idempotency_key`` when given (the same key
        within the server's ``idempotency_ttl`` returns the task it made: give one to make a
        submission safe to repeat across runs of a script), else a fresh uuid4. A lost answer is
        asked again with it (see the module's documentation).
        """
        task = self._send("POST", self._url(), params=_options(priority, timeout), body=arguments,
                          idempotency_key=_key(idempotency_key))
        return str(task["uuid"])

    def submit_many(self, items: Iterable[Mapping[str, Any]], *, priority: Optional[int] = None,
                    timeout: Optional[float] = None, idempotency_key: Optional[str] = None) -> list[dict[str, Any]]:
        """Queue one task per mapping of keyword arguments, all or none; return their task objects in order.

        Sent with an ``Idempotency-Key`` and asked again when the answer is lost, as :meth:`submit`.
        """
        body = [dict(item) for item in items]
        if not body:
            return []
        answer = self._send("POST", self._url(), params=_options(priority, timeout), body=body,
                            idempotency_key=_key(idempotency_key))
        return list(answer["tasks"])

    def status(self, uuid: str) -> dict[str, Any]:
        """The task object of task ``uuid`` (its uuid, or a prefix of 8 or more hex digits of it)."""
        return dict(self._send("GET", self._url(), params={"uuid": self.resolve(uuid)}))

    def stop(self, uuid: str) -> dict[str, Any]:
        """Stop task ``uuid``; return its task object: ``stopping`` while it stops, ``stopped`` if it was queued."""
        return dict(self._send("DELETE", self._url(), params={"uuid": self.resolve(uuid)}))

    def finish(self, uuid: str) -> dict[str, Any]:
        """Ask running task ``uuid`` to finish now and return its best answer so far (``DELETE ?finish=true``);
        return its task object, ``stopping`` until it ends ``stopped`` with that ``result`` and
        ``stopped_with_result: true`` (``stopped`` at once, without a result, if it was queued).

        .. versionadded:: 0.3
        """
        return dict(self._send("DELETE", self._url(), params={"uuid": self.resolve(uuid), "finish": "true"}))

    def stop_all(self) -> dict[str, int]:
        """Stop every queued and running task of the resource's controller: ``{"stopped": n, "stopping": m}``
        (queued tasks stopped, running ones asked to stop)."""
        return dict(self._send("DELETE", self._url(), params={"all": "true"}))

    def pause(self, uuid: str) -> dict[str, Any]:
        """Pause running task ``uuid`` (its whole process tree is suspended); return its task object."""
        return self._patch(uuid, {"status": "paused"})

    def resume(self, uuid: str) -> dict[str, Any]:
        """Resume paused task ``uuid``; return its task object."""
        return self._patch(uuid, {"status": "running"})

    def reprioritise(self, uuid: str, priority: int) -> dict[str, Any]:
        """Give queued task ``uuid`` another ``priority`` (lower runs first); return its task object."""
        return self._patch(uuid, {"priority": priority})

    def _patch(self, uuid: str, change: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._send("PATCH", self._url(), params={"uuid": self.resolve(uuid)}, body=dict(change)))

    def resolve(self, uuid: str) -> str:
        """The uuid of the task ``uuid`` names: itself when it is a uuid (or nothing like one, for the server
        to refuse); else, for a prefix of 8 or more hex digits, the uuid of the one task it begins.

        :raises NotFound: no task's uuid begins with the prefix.
        :raises AmbiguousPrefix: several do.
        """
        try:
            return str(uuid_module.UUID(uuid))
        except (TypeError, ValueError, AttributeError):
            pass
        digits = uuid.replace("-", "").lower() if isinstance(uuid, str) else ""
        if not MIN_PREFIX_DIGITS <= len(digits) < 32 or digits.strip("0123456789abcdef"):
            return uuid  # not a prefix: the server says what is wrong with it
        url = f"{self.base_url}{self.prefix}/api/tasks"
        found = list(self._send("GET", url, params={"uuid_prefix": uuid,
                                                   "limit": str(PREFIX_CANDIDATES + 1)})["tasks"])
        if not found:
            raise NotFound(f"No task's uuid begins with {uuid}.", status=404, url=url)
        if len(found) > 1:
            shown = found[:PREFIX_CANDIDATES]
            listed = "; ".join(f"{t.get('uuid')} ({t.get('controller')}, {t.get('status')})" for t in shown)
            more = "more than " if len(found) > PREFIX_CANDIDATES else ""
            raise AmbiguousPrefix(f"{uuid} begins the uuid of {more}{len(shown)} tasks: {listed}. Give more of "
                                  f"the uuid.", shown, url=url)
        return str(found[0]["uuid"])

    def rerun(self, uuid: str) -> dict[str, Any]:
        """Queue ended task ``uuid`` again (``POST <prefix>/api/tasks/<uuid>/rerun``); return the new task's object.

        The new task has the same arguments, priority and timeout; its ``rerun_of`` is ``uuid``. A task that
        has not ended raises :class:`Conflict` (409); one the server does not know, :class:`NotFound`.
        """
        path = f"{self.prefix}/api/tasks/{urllib.parse.quote(uuid, safe='')}/rerun"
        return dict(self._send("POST", self.base_url + path))

    def logs(self, uuid: str) -> list[Any]:
        """The log lines the server keeps for task ``uuid`` (``GET <prefix>/api/tasks/<uuid>/logs``).

        The answer is a JSON array of lines, or an object holding them under ``lines``.
        """
        uuid = self.resolve(uuid)
        path = f"{self.prefix}/api/tasks/{urllib.parse.quote(uuid, safe='')}/logs"
        answer = self._send("GET", self.base_url + path)
        if isinstance(answer, dict):
            answer = answer.get("lines", [])
        if not isinstance(answer, list):
            raise ClientError(f"The logs of task {uuid} are not a list: {answer!r:.80}")
        return answer

    def wait(self, uuid: str, timeout: Optional[float] = None, progress: bool = False) -> dict[str, Any]:
        """Wait until task ``uuid`` has ended, or ``timeout`` seconds passed; return its task object.

        It long-polls (``?wait=``) in chunks of :data:`WAIT_CHUNK` seconds, below the
        server's ``max_wait``, so no proxy or worker timeout cuts a request. With
        ``progress=True`` it draws a tqdm bar of the task's ``percent`` on standard error,
        reading the task every :data:`PROGRESS_INTERVAL` seconds instead.
        Check the returned ``status``: after a ``timeout`` the task may still run.
        """
        uuid = self.resolve(uuid)
        deadline = None if timeout is None else time.monotonic() + timeout
        chunk = PROGRESS_INTERVAL if progress else WAIT_CHUNK
        bar = _progress_bar(uuid) if progress else None
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                wait = chunk if remaining is None else min(chunk, remaining)
                task = dict(self._send("GET", self._url(), params={"uuid": uuid, "wait": f"{wait:.3f}"},
                                       timeout=wait + self.timeout))
                if bar is not None:
                    _show(bar, task)
                ended = task.get("status") in TERMINAL_STATES
                if ended or (deadline is not None and time.monotonic() >= deadline):
                    return task
        finally:
            if bar is not None:
                bar.close()

    def wait_batch(self, batch: str, timeout: Optional[float] = None) -> dict[str, Any]:
        """Wait until every task of a batch has ended, or ``timeout`` seconds passed.

        ``batch`` is the ``batch`` of the task objects :meth:`submit_many` returns. Returns
        ``{"batch", "total", "ended", "tasks"}`` (tasks in input order, large values clipped as in
        the list view); it long-polls ``?batch=&wait=`` in chunks of :data:`WAIT_CHUNK` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            wait = WAIT_CHUNK if remaining is None else min(WAIT_CHUNK, remaining)
            view = dict(self._send("GET", self._url(), params={"batch": batch, "wait": f"{wait:.3f}"},
                                   timeout=wait + self.timeout))
            late = deadline is not None and time.monotonic() >= deadline
            if view.get("ended") == view.get("total") or late:
                return view

    # -- HTTP ---------------------------------------------------------------------------------

    def _url(self) -> str:
        return self.base_url + self.resource

    def _send(self, method: str, url: str, params: Optional[Mapping[str, str]] = None, body: Any = None,
              timeout: Optional[float] = None, idempotency_key: Optional[str] = None) -> Any:
        """Send one request, retrying 429 and 503 answers; return the decoded JSON of the answer.

        With ``idempotency_key`` (sent as the ``Idempotency-Key`` header), a request whose answer was
        lost (no answer, or 502/503/504) is sent again with the same key, after a growing delay.
        """
        requests = _import_requests()
        headers = dict(self.headers)
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        lost = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        attempt = 0
        while True:
            try:
                response = self._request(method, url, params, body, headers,
                                         self.timeout if timeout is None else timeout)
            except requests.RequestException as exc:
                if idempotency_key is None or not isinstance(exc, lost) or attempt >= self.max_retries:
                    raise TransportError(f"{method} {url} got no answer: {exc}", url=url) from exc
                attempt += 1
                time.sleep(self._backoff(attempt))
                continue
            if response.status_code < 400:
                return _json(response)
            error = _error(response)
            if error.retry_after is not None:
                delay = error.retry_after
            else:
                delay = self._backoff(attempt + 1) if idempotency_key is not None else DEFAULT_RETRY_DELAY
            retried = _RETRIED | _LOST if idempotency_key is not None else _RETRIED
            retry = response.status_code in retried and attempt < self.max_retries
            if not retry or delay > self.max_retry_delay:
                raise error
            attempt += 1
            time.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1, 2, ...) of a lost answer."""
        return min(RETRY_BACKOFF * float(2 ** (attempt - 1)), self.max_retry_delay)

    def _request(self, method: str, url: str, params: Optional[Mapping[str, str]], body: Any,
                 headers: Mapping[str, str], timeout: float) -> requests.Response:
        """One request, following redirects within its origin only (requests would follow any, sending
        custom headers, and for a 307 or 308 the body, to whatever host the server names).

        :raises RedirectRefused: a redirect to another origin, or more than :data:`MAX_REDIRECTS`.
        """
        for _ in range(MAX_REDIRECTS + 1):
            response = self.session.request(method, url, params=params, json=body, headers=headers or None,
                                            auth=self.auth, timeout=timeout, allow_redirects=False)
            if not response.is_redirect:
                return response
            target = urllib.parse.urljoin(response.url, response.headers["Location"])
            if _origin(target) != _origin(response.url):
                response.close()
                raise RedirectRefused(
                    f"{method} {url} was redirected ({response.status_code}) to another origin, "
                    f"{_origin_text(target)}: not followed, so that no credentials or body go there.",
                    status=response.status_code, response=response)
            response.close()
            if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None  # what browsers (and requests) do
            url, params = target, None  # the Location carries its own query
        raise RedirectRefused(f"{method} {url} was redirected more than {MAX_REDIRECTS} times.",
                              status=response.status_code, response=response)

    def list(self, status: Union[None, str, Iterable[str]] = None, limit: Optional[int] = None) -> dict[str, Any]:
        """The list view: ``{"tasks": [...], "running": n, "queued": m, "max_num_process": k}``, newest first.

        :param status: only tasks in this state, or in these states.
        :param limit: the most tasks to list (the server's default: 100).
        """
        params: dict[str, str] = {}
        if status is not None:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        if limit is not None:
            params["limit"] = str(limit)
        return dict(self._send("GET", self._url(), params=params))


def _key(given: Optional[str]) -> str:
    """The ``Idempotency-Key`` of a submission: the caller's, else a fresh uuid4."""
    return str(uuid_module.uuid4()) if given is None else given


def _origin(url: str) -> tuple[str, str, Optional[int]]:
    """The origin of ``url``: scheme, host and port (the scheme's default when the URL names none)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1  # unreadable: never the origin of a valid URL
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _origin_text(url: str) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


def _options(priority: Optional[int], timeout: Optional[float]) -> dict[str, str]:
    options = {}
    if priority is not None:
        options["priority"] = str(priority)
    if timeout is not None:
        options["timeout"] = repr(float(timeout))
    return options


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ClientError(f"The answer to {response.request.method} {response.url} is not JSON: "
                          f"{response.text[:200]!r}", status=response.status_code, response=response) from None


def _error(response: requests.Response) -> ClientError:
    """The :class:`ClientError` of an error answer, with the server's ``message`` when it sent one.

    An answer without one is not the API's (a URL the server does not serve, a proxy's error page): its
    message names the method and URL, and for a 404 says to check the base URL and resource path.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    url = _without_query(response.url or "")
    if not isinstance(message, str) or (response.status_code == 404 and _is_werkzeug_404(message)):
        method = response.request.method if response.request is not None else "request"
        message = f"{method} {url} answered {response.status_code} {response.reason or ''}".rstrip()
        if response.status_code == 404:
            message += ": the server has no such URL (check the base URL and the resource path)"
    cls = _BY_STATUS.get(response.status_code, ServerError if response.status_code >= 500 else ClientError)
    return cls(message, status=response.status_code, response=response,
               retry_after=parse_retry_after(response.headers.get("Retry-After")), url=url)


def _is_werkzeug_404(message: str) -> bool:
    """Whether ``message`` is werkzeug's text for a URL that matches no route (what flask-restful sends as
    JSON for one), rather than this API's "no such task"."""
    return message.startswith("The requested URL was not found on the server.")


def _without_query(url: str) -> str:
    """``url`` without its query string (the uuid and options are not part of which URL it was)."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# -- optional imports and the progress bar ---------------------------------------------------------


def _import_requests() -> Any:
    try:
        import requests
    except ImportError as exc:
        raise ImportError(f"flask_multiprocess_controller.client needs requests: {_EXTRA}") from exc
    return requests


def _progress_bar(uuid: str) -> tqdm[Any]:
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError(f"Client.wait(progress=True) needs tqdm: {_EXTRA}") from exc

    class _Bar(tqdm):  # type: ignore[type-arg]
        # No monitor thread: the bar is updated by hand, and a thread lingering for ten seconds
        # after the wait would outlive the call that made it.
        monitor_interval = 0

    return _Bar(total=100, desc=f"task {uuid[:8]}", unit="%",
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")


def _show(bar: tqdm[Any], task: Mapping[str, Any]) -> None:
    percent = task.get("percent")
    if isinstance(percent, (int, float)):
        bar.update(min(max(float(percent), 0.0), 100.0) - bar.n)
    bar.set_postfix_str(str(task.get("status")), refresh=False)
    bar.refresh()
