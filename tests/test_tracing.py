"""Trace context: a POST's W3C ``traceparent`` is kept with its tasks and carried by their log lines (the
kept log and the app's records) and callbacks (body and header); with the OpenTelemetry SDK, submit, queue
and run are spans of that trace; without ``opentelemetry`` installed, the header is still kept."""
from __future__ import annotations

import logging
import sys
import uuid as uuid_module
from typing import Any, Iterator

import pytest
from conftest import wait_until
from flask import Flask
from flask_restful import Api
from test_lifecycle import Receiver

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


class Traced(MetaMPTask):
    """Logs one line, then answers."""

    def execute(self, x: int = 1) -> int:
        self.logger.warning("working on %d", x)
        return x + 1


class HeaderReceiver(Receiver):
    """A callback receiver that also keeps each request's ``traceparent`` header, by task uuid and event."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: dict[tuple[str, str], Any] = {}

    def _app(self, environ, start_response):  # type: ignore[no-untyped-def]
        answer = super()._app(environ, start_response)
        with self._lock:
            if self.bodies:
                last = self.bodies[-1]
                self.headers.setdefault((last["uuid"], last["event"]), environ.get("HTTP_TRACEPARENT"))
        return answer


def _client(controller: MetaMPController) -> Any:
    app = Flask(__name__)
    resource = type(f"R{uuid_module.uuid4().hex}", (MetaMPResource,), {})
    Api(app).add_resource(resource, "/traced", "/traced/<string:uuid>", resource_class_args=(controller,))
    return app.test_client()


def _log_lines(controller: MetaMPController, uuid: str) -> list[str]:
    return [line for _, line in controller.store.logs.read(uuid)]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(60)
def test_a_posts_traceparent_is_in_the_tasks_log_lines_and_callbacks(make_controller):
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    try:
        with HeaderReceiver() as receiver:
            controller = make_controller(Traced, callback_url=receiver.url)
            client = _client(controller)
            answer = client.post("/traced", json={"x": 1}, headers={"traceparent": TRACEPARENT})
            assert answer.status_code == 202
            uuid = answer.get_json()["uuid"]
            task = client.get(f"/traced/{uuid}?wait=20").get_json()
            assert task["status"] == "succeeded"
            assert task["traceparent"] is not None and task["traceparent"][3:35] == TRACE

            # The kept log line names the trace; so does the app's record of it (the logging bridge).
            line = wait_until(lambda: [t for t in _log_lines(controller, uuid) if "working on 1" in t])[0]
            assert f"trace_id={TRACE}" in line
            mine = wait_until(lambda: [r for r in records.records if r.getMessage() == "working on 1"])
            assert mine[0].trace_id == TRACE

            # Both callbacks carry it: in the body, and as the request's traceparent header.
            bodies = wait_until(lambda: receiver.both_events(uuid), timeout=20)
            for kind in ("started", "ended"):
                assert bodies[kind]["trace_id"] == TRACE
                assert receiver.headers[(uuid, kind)] == task["traceparent"]

            # A bulk POST: every task of it is in the trace.
            bulk = client.post("/traced", json=[{"x": 2}, {"x": 3}], headers={"traceparent": TRACEPARENT})
            assert bulk.status_code == 202
            assert [t["traceparent"][3:35] for t in bulk.get_json()["tasks"]] == [TRACE, TRACE]

            # A malformed header is ignored (the W3C recommendation), never refused; none: no trace.
            for header in ({"traceparent": f"00-{TRACE.upper()}-{PARENT}-01"}, {"traceparent": "nonsense"}, {}):
                plain = client.post("/traced?wait=20", json={"x": 4}, headers=header)
                assert plain.status_code == 200 and plain.get_json()["traceparent"] is None, header
                assert all("trace_id=" not in t for t in _log_lines(controller, plain.get_json()["uuid"]))
    finally:
        root.removeHandler(records)


@pytest.fixture
def spans() -> Iterator[Any]:
    """The OpenTelemetry SDK as the global tracer provider, spans kept in memory; put back as it was after."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE
    trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = None, Once()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER, trace._TRACER_PROVIDER_SET_ONCE = saved


@pytest.mark.timeout(60)
def test_submit_queue_and_run_are_spans_of_the_posts_trace(make_controller, spans):
    from opentelemetry import trace

    controller = make_controller(Traced)
    client = _client(controller)
    task = client.post("/traced?wait=20", json={"x": 1}, headers={"traceparent": TRACEPARENT}).get_json()
    assert task["status"] == "succeeded"
    uuid = task["uuid"]
    found = {span.name: span for span in spans.get_finished_spans()
             if span.attributes.get("mpc.task.uuid") == uuid}
    assert set(found) == {"mpc.submit", "mpc.queue", "mpc.run"}
    submit = found["mpc.submit"]
    assert submit.context.trace_id == int(TRACE, 16) and submit.parent.span_id == int(PARENT, 16)
    # The task keeps the submit span's context: the queue and run spans are its children.
    assert task["traceparent"] == f"00-{TRACE}-{submit.context.span_id:016x}-01"
    for name in ("mpc.queue", "mpc.run"):
        span = found[name]
        assert span.context.trace_id == int(TRACE, 16), name
        assert span.parent.span_id == submit.context.span_id, name
        assert span.attributes["mpc.controller"] == controller.name, name
    assert found["mpc.queue"].end_time <= found["mpc.run"].start_time <= found["mpc.run"].end_time
    assert found["mpc.run"].attributes["mpc.status"] == "succeeded"

    # The Python API joins the caller's current span.
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        uuid = controller.submit(x=2)
    assert controller.wait(uuid, timeout=20)["traceparent"][3:35] == f"{caller.get_span_context().trace_id:032x}"


@pytest.mark.timeout(60)
def test_without_opentelemetry_the_header_is_kept_and_nothing_breaks(make_controller, monkeypatch):
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)  # every import of it now fails
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setattr(tracing, "_trace", None)  # as in a process where it never was importable
    controller = make_controller(Traced)
    client = _client(controller)
    task = client.post("/traced?wait=20", json={"x": 1}, headers={"traceparent": TRACEPARENT}).get_json()
    assert task["status"] == "succeeded" and task["traceparent"] == TRACEPARENT
    assert any(f"trace_id={TRACE}" in line for line in wait_until(lambda: _log_lines(controller, task["uuid"])))
    uuid = controller.submit(x=2)
    assert controller.wait(uuid, timeout=20)["traceparent"] is None
    assert controller.enqueue([{"x": 3}], traceparent=TRACEPARENT)[0]["traceparent"] == TRACEPARENT


@pytest.mark.timeout(60)
def test_without_a_tracer_provider_no_span_is_made_and_the_header_is_kept(make_controller, monkeypatch):
    # No provider set: OpenTelemetry would only make a non-recording span carrying its parent, so none is
    # made (each POST would pay for it) and the task keeps the incoming trace context as it came.
    from opentelemetry import trace

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    asked = []
    monkeypatch.setattr(trace, "get_tracer", lambda *args, **kwargs: asked.append(args) or trace.NoOpTracer())
    controller = make_controller(Traced)
    client = _client(controller)
    task = client.post("/traced?wait=20", json={"x": 1}, headers={"traceparent": TRACEPARENT}).get_json()
    assert task["status"] == "succeeded" and task["traceparent"] == TRACEPARENT
    assert controller.wait(controller.submit(x=2), timeout=20)["traceparent"] is None
    assert asked == []
