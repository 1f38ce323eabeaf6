"""W3C trace context for tasks, and OpenTelemetry spans when ``opentelemetry-api`` is installed.

A task keeps the ``traceparent`` (https://www.w3.org/TR/trace-context/) of the trace it was queued in:
the header of the POST that queued it, or the current OpenTelemetry span of the code that called the
Python API. Its log lines and its callbacks carry that trace's id, so what a task did can be found from
the request that asked for it, whatever tracing the application has.

With ``opentelemetry-api`` installed (the ``tracing`` extra) and a tracer provider set up by the
application, three spans of that trace are recorded:

``mpc.submit``
    Around the submission, in the process that queued the task; the parent of the two others.
``mpc.queue``
    From the task's ``created_at`` to its first ``started_at``: the wait in the queue.
``mpc.run``
    From an attempt's ``started_at`` to its ``ended_at``, one per attempt.

The queue and run spans are made with those explicit times once the run ended, in the serving process
that supervised it (the one that records the end), so they hold whichever process queued the task and
whichever one ran it. Without ``opentelemetry-api`` nothing of this is imported and no span is made;
the ``traceparent`` is then kept as it came.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from typing import Any, Iterator, Optional, Sequence

__all__ = [
    "HEADER", "parse", "trace_id", "incoming", "Submission", "submission", "record_run", "attached",
]

#: The request and callback header that carries a trace context.
HEADER = "traceparent"

#: The name of the tracer the spans are made with.
TRACER = "flask_multiprocess_controller"

_logger = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")


def parse(value: Any) -> Optional[str]:
    """The ``traceparent`` of version 00 that ``value`` carries, or None when it carries none valid.

    As the W3C recommendation says, an invalid value is ignored (never refused): the wrong version
    ``ff``, an all-zero trace or parent id, upper-case hex, or version 00 with more after it. A later
    version is read for its first four parts. Surrounding whitespace is allowed.
    """
    if not isinstance(value, str) or len(value) > 512:
        return None
    found = _TRACEPARENT.match(value.strip(" \t"))
    if found is None:
        return None
    version, trace, parent, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or set(trace) == {"0"} or set(parent) == {"0"}:
        return None
    return f"00-{trace}-{parent}-{flags}"


def trace_id(traceparent: Optional[str]) -> Optional[str]:
    """The 32 hex digits of the trace id of a (valid) ``traceparent``; None for None."""
    return None if not traceparent else traceparent[3:35]


#: Set once an import of ``opentelemetry`` failed: every submission asks, and a failing import searches the
#: whole ``sys.path`` each time. It is tried again only once something else has imported the package.
_missing = False
#: ``opentelemetry.trace`` once an import of it completed (a module another thread is still importing is in
#: ``sys.modules`` half made: only the import statement waits for it).
_trace: Any = None


def _otel() -> Any:
    """``opentelemetry.trace``, or None when ``opentelemetry-api`` is not installed."""
    global _missing, _trace
    if _trace is not None:  # imported already: no import machinery on every submission
        return _trace
    if _missing and sys.modules.get("opentelemetry") is None:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        _missing = True
        return None
    _trace = trace
    return trace


def _records_spans(trace: Any) -> bool:
    """Whether a tracer provider is set (by the application, or by ``OTEL_PYTHON_TRACER_PROVIDER``): without
    one, OpenTelemetry's proxy tracer makes only non-recording spans that carry their parent's context, so a
    submission keeps the incoming ``traceparent`` as it is, and making the span would only cost time."""
    proxy = getattr(trace, "ProxyTracerProvider", None)
    return proxy is None or not isinstance(trace.get_tracer_provider(), proxy)


def _format(span_context: Any) -> Optional[str]:
    """The ``traceparent`` of an OpenTelemetry span context (None when it is not valid)."""
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def _context_of(trace: Any, traceparent: Optional[str]) -> Any:
    """An OpenTelemetry context whose current span is the remote one ``traceparent`` names (None: none)."""
    if traceparent is None:
        return None
    span_context = trace.SpanContext(
        trace_id=int(traceparent[3:35], 16), span_id=int(traceparent[36:52], 16), is_remote=True,
        trace_flags=trace.TraceFlags(int(traceparent[53:55], 16)))
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context))


def _request_header() -> Optional[str]:
    from flask import has_request_context, request

    return parse(request.headers.get(HEADER)) if has_request_context() else None


def incoming(explicit: Optional[str] = None) -> Optional[str]:
    """The trace a submission made now belongs to, as a ``traceparent`` (None: none).

    ``explicit`` (the Python API's ``traceparent=``) when it is valid; else the current OpenTelemetry
    span, when ``opentelemetry-api`` is installed and one is current (an instrumented Flask app's server
    span, say, itself a child of the request's header); else the ``traceparent`` header of the request
    being served. An invalid value is ignored, as the W3C recommendation says.
    """
    if explicit is not None:
        if not isinstance(explicit, str):
            raise TypeError(f"traceparent= is a string, not {explicit!r}.")
        found = parse(explicit)
        if found is not None:
            return found
    trace = _otel()
    if trace is not None:
        current = _format(trace.get_current_span().get_span_context())
        if current is not None:
            return current
    return _request_header()


class Submission:
    """What :func:`submission` yields: the ``traceparent`` to keep with the tasks, and their span."""

    def __init__(self, traceparent: Optional[str], span: Any = None) -> None:
        #: What the tasks keep: the ``mpc.submit`` span's context, or the incoming one without a span.
        self.traceparent = traceparent
        self._span = span

    def tasks(self, uuids: Sequence[str], batch: Optional[str]) -> None:
        """Name the tasks the submission queued on its span."""
        if self._span is None or not self._span.is_recording():
            return
        self._span.set_attribute("mpc.task.uuid", uuids[0] if len(uuids) == 1 else list(uuids))
        self._span.set_attribute("mpc.task.count", len(uuids))
        if batch is not None:
            self._span.set_attribute("mpc.batch", batch)


@contextlib.contextmanager
def submission(controller: str, explicit: Optional[str] = None) -> Iterator[Submission]:
    """Around a submission: the ``mpc.submit`` span (with ``opentelemetry-api``), a child of the incoming
    trace (see :func:`incoming`) or, with none, of the current context (a new trace when the application's
    tracer provider records one). An exception raised inside is recorded on the span."""
    parent = incoming(explicit)
    trace = _otel()
    if trace is None or not _records_spans(trace):
        yield Submission(parent)
        return
    tracer = trace.get_tracer(TRACER)
    with tracer.start_as_current_span("mpc.submit", context=_context_of(trace, parent),
                                      kind=trace.SpanKind.INTERNAL,
                                      attributes={"mpc.controller": controller}) as span:
        yield Submission(_format(span.get_span_context()) or parent, span)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def record_run(controller: str, uuid: str, traceparent: Optional[str], attempt: Optional[int],
               created_at: Optional[float], started_at: Optional[float], ended_at: Optional[float],
               status: str, error: Optional[dict[str, Any]] = None) -> None:
    """Record the ``mpc.queue`` span (on the first attempt) and the ``mpc.run`` span of a run that ended,
    with their times, in the trace ``traceparent`` names. Does nothing without ``opentelemetry-api``, a
    trace or the times; never raises (a tracing failure must not touch the task's record)."""
    trace = _otel()
    if trace is None or traceparent is None or started_at is None or ended_at is None or not _records_spans(trace):
        return
    try:
        tracer = trace.get_tracer(TRACER)
        parent = _context_of(trace, traceparent)
        attributes = {"mpc.controller": controller, "mpc.task.uuid": uuid}
        if (attempt or 1) <= 1 and created_at is not None:
            queued = tracer.start_span("mpc.queue", context=parent, attributes=attributes,
                                       start_time=_ns(created_at))
            queued.end(end_time=_ns(max(created_at, started_at)))
        run = tracer.start_span("mpc.run", context=parent, start_time=_ns(started_at),
                                attributes={**attributes, "mpc.attempt": attempt or 1, "mpc.status": status})
        if error is not None:
            run.set_status(trace.Status(trace.StatusCode.ERROR, f"{error.get('type')}: {error.get('message')}"))
        run.end(end_time=_ns(max(started_at, ended_at)))
    except Exception:  # the task's end is recorded whatever the tracer does
        _logger.debug("Recording the spans of task %s failed.", uuid, exc_info=True)


@contextlib.contextmanager
def attached(traceparent: Optional[str]) -> Iterator[None]:
    """Make ``traceparent`` the current trace context inside (with ``opentelemetry-api``): the serving
    process handles a task's log record so, and OpenTelemetry's logging handler links it to the trace."""
    trace = _otel()
    if trace is None or traceparent is None:
        yield
        return
    from opentelemetry import context

    token = context.attach(_context_of(trace, traceparent))
    try:
        yield
    finally:
        context.detach(token)
