"""The OpenAPI 3.1 document: what it declares for each mount, that it is a valid document, and
(schemathesis) that the example app's answers conform to it and are never a 500. That the argument
check enforces exactly the request schema declared here is tested in test_arguments.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pytest
from flask import Flask
from flask_restful import Api
from openapi_spec_validator import validate

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask
from flask_multiprocess_controller.http.openapi import openapi_document

from serverproc import free_port, python, unexpected_tracebacks

TESTS = Path(__file__).resolve().parent


class Solve(MetaMPTask):
    """Solve a puzzle of some size.

    Longer text about the solver.
    """

    def execute(self, size: int, method: Literal["fast", "exact"] = "fast", tolerance: Optional[float] = None,
                name: str = "", verbose: bool = False, seeds: list = [], options: dict = {},  # noqa: B006
                anything: Any = None, either: Union[int, str] = 0, mode: Optional[Literal[1, 2]] = None) -> dict:
        """Run the solver.

        :param size: edge length of the puzzle,
            in cells.
        :param method: which algorithm.
        :returns: the solution.
        """
        return {}


class Open(MetaMPTask):
    def execute(self, n: int = 0, **rest: Any) -> None:
        return None


class WithPriority(MetaMPTask):
    def execute(self, priority: int = 0) -> None:
        return None


class Override(MetaMPController, controller_name="custom"):
    def post(self, *args: Any, **kwargs: Any) -> Any:
        return {"custom": True}

    def put(self, *args: Any, **kwargs: Any) -> Any:
        return {"put": kwargs}


def _app(*mounts: tuple[MetaMPController, tuple[str, ...]]) -> Flask:
    app = Flask("docs")
    api = Api(app)
    for i, (controller, urls) in enumerate(mounts):
        api.add_resource(MetaMPResource, *urls, endpoint=f"mount{i}", resource_class_args=(controller,))
    return app


@pytest.mark.timeout(30)
def test_document_is_valid_openapi_3_1_with_every_mount(make_controller):
    solve = make_controller(Solve)
    seed_style = make_controller(Open, store="memory://")
    app = _app((solve, ("/solve", "/solve/<string:uuid>")), (seed_style, ("/open",)))
    document = openapi_document(app, title="Solver", version="2.1")
    validate(document)  # raises on any error
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "Solver" and document["info"]["version"] == "2.1"
    assert set(document["paths"]) == {"/solve", "/solve/{uuid}", "/open"}
    # The methods each URL serves (HEAD and OPTIONS are Flask's own and left out).
    assert set(document["paths"]["/solve"]) == {"get", "post", "delete", "patch"}
    assert set(document["paths"]["/solve/{uuid}"]) == {"get", "post", "delete", "patch", "parameters"}
    assert document["paths"]["/solve/{uuid}"]["parameters"][0]["schema"]["format"] == "uuid"
    json.dumps(document)  # JSON-ready


@pytest.mark.timeout(30)
def test_status_codes_of_the_http_table(make_controller):
    app = _app((make_controller(Solve), ("/solve", "/solve/<string:uuid>")))
    paths = openapi_document(app)["paths"]
    # 409: the tasks of an Idempotency-Key were purged; 422: the key came with another body.
    assert set(paths["/solve"]["post"]["responses"]) == {"200", "202", "400", "409", "413", "422", "429", "503"}
    assert set(paths["/solve/{uuid}"]["get"]["responses"]) == {"200", "400", "404", "503"}
    assert set(paths["/solve"]["get"]["responses"]) == {"200", "202", "400", "404", "503"}  # 202: ?batch= not ended
    assert set(paths["/solve/{uuid}"]["delete"]["responses"]) == {"200", "202", "400", "403", "404", "409", "503"}
    assert set(paths["/solve/{uuid}"]["post"]["responses"]) == {"400"}  # POST goes to the collection URL
    document = openapi_document(app)
    responses = document["components"]["responses"]
    assert "Retry-After" in responses["QueueFull"]["headers"]
    assert "Retry-After" in responses["Unavailable"]["headers"]
    assert "Allow" in responses["MethodNotAllowed"]["headers"]
    assert document["components"]["schemas"]["Error"]["required"] == ["message"]
    assert "Location" in paths["/solve"]["post"]["responses"]["202"]["headers"]


@pytest.mark.timeout(30)
def test_query_options(make_controller):
    app = _app((make_controller(Solve), ("/solve", "/solve/<string:uuid>")))
    document = openapi_document(app)
    params = document["components"]["parameters"]

    def names(operation: dict) -> set[str]:
        return {params[p["$ref"].rsplit("/", 1)[1]]["name"] if "$ref" in p else p["name"]
                for p in operation.get("parameters", [])}

    paths = document["paths"]
    assert names(paths["/solve"]["post"]) == {"priority", "timeout", "wait", "share", "Idempotency-Key", "traceparent"}
    assert params["idempotencyKey"]["in"] == "header"
    assert names(paths["/solve"]["get"]) == {"uuid", "batch", "wait", "status", "limit"}
    assert names(paths["/solve/{uuid}"]["get"]) == {"wait"}
    assert names(paths["/solve"]["delete"]) == {"uuid", "all", "finish"}
    assert names(paths["/solve/{uuid}"]["delete"]) == {"finish"}
    stop_all = paths["/solve"]["delete"]["responses"]["202"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/StopAll"} in stop_all["anyOf"]
    assert params["status"]["schema"]["items"] == {"$ref": "#/components/schemas/TaskStatus"}
    assert params["status"]["explode"] is False  # ?status=queued,running
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}


@pytest.mark.timeout(30)
def test_request_body_from_the_signature_and_docstring(make_controller):
    app = _app((make_controller(Solve), ("/solve",)))
    document = openapi_document(app)
    body = document["paths"]["/solve"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = body["oneOf"][0]["$ref"]
    assert body["oneOf"][1] == {"type": "array", "items": {"$ref": ref}, "minItems": 1, "maxItems": 1000}
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["required"] == ["size"]
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["size"] == {"type": "integer", "description": "edge length of the puzzle, in cells."}
    assert props["method"] == {"enum": ["fast", "exact"], "default": "fast", "description": "which algorithm."}
    assert props["tolerance"] == {"type": ["number", "null"], "default": None}
    assert props["name"] == {"type": "string", "default": ""}
    assert props["verbose"] == {"type": "boolean", "default": False}
    assert props["seeds"] == {"type": "array", "default": []}
    assert props["options"] == {"type": "object", "default": {}}
    assert props["anything"] == {"default": None}
    assert props["either"] == {"type": ["integer", "string"], "default": 0}
    assert props["mode"] == {"enum": [1, 2, None], "default": None}
    assert "priority" not in props  # the seed's body priority is honoured, but only ?priority= is offered
    assert schema["description"] == "Run the solver."


class Marked(MetaMPTask):
    """Count with :class:`~collections.Counter` and ``sorted``."""

    def execute(self, text: str = "") -> None:
        """Count the words of :obj:`text`, see :meth:`the counter <collections.Counter.update>`.

        :param text: a :class:`str` of ``words``.
        """


@pytest.mark.timeout(30)
def test_extension_urls_and_descriptions_without_rest_markup(make_controller):
    from flask_multiprocess_controller import MultiprocessController

    app = _app((make_controller(Marked), ("/marked",)))
    MultiprocessController(app)
    document = openapi_document(app)
    validate(document)
    paths = document["paths"]
    assert {"/mpc/health", "/mpc/api/tasks/{uuid}/logs", "/mpc/events", "/mpc/api/schedules"} <= set(paths)
    assert set(paths["/mpc/health"]["get"]["responses"]) == {"200", "503"}
    assert "text/event-stream" in paths["/mpc/events"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} == set(
        paths["/mpc/api/tasks/{uuid}/logs"]["get"]["responses"]["200"]["content"])
    assert "uuid_prefix" in {p.get("name") for p in paths["/mpc/api/tasks"]["get"]["parameters"]}
    schema = document["components"]["schemas"]["Marked.Arguments"]
    assert schema["description"] == "Count the words of `text`, see `the counter`."
    assert schema["properties"]["text"]["description"] == "a `str` of `words`."
    assert {"name": "Marked", "description": "Count the words of `text`, see `the counter`."} in document["tags"]
    assert ":class:" not in json.dumps(document) and "``" not in json.dumps(document)
    with app.test_client() as client:  # what the document says the URLs answer
        assert client.get("/mpc/health").status_code == 200
        assert client.get("/mpc/api/schedules").get_json() == {"schedules": []}
        uuid = client.post("/marked", json={"text": "a b"}).get_json()["uuid"]
        assert client.get(f"/mpc/api/tasks/{uuid}/logs").get_json()["next"] == 0


@pytest.mark.timeout(30)
def test_kwargs_open_the_schema_and_a_priority_parameter_is_an_argument(make_controller):
    app = _app((make_controller(Open), ("/open",)), (make_controller(WithPriority), ("/prio",)))
    schemas = openapi_document(app)["components"]["schemas"]
    open_schema = schemas["Open.Arguments"]
    assert "additionalProperties" not in open_schema
    assert open_schema["propertyNames"] == {"not": {"const": "self"}}
    assert schemas["WithPriority.Arguments"]["properties"]["priority"] == {"type": "integer", "default": 0}


@pytest.mark.timeout(30)
def test_links_from_post_to_the_task(make_controller):
    app = _app((make_controller(Solve), ("/solve", "/solve/<string:uuid>")), (make_controller(Open), ("/open",)))
    paths = openapi_document(app)["paths"]
    links = paths["/solve"]["post"]["responses"]["202"]["links"]
    assert links["GetTask"] == {"operationId": paths["/solve/{uuid}"]["get"]["operationId"],
                                "parameters": {"path.uuid": "$response.body#/uuid"}}
    seed = paths["/open"]["post"]["responses"]["202"]["links"]
    assert seed["StopTask"]["parameters"] == {"query.uuid": "$response.body#/uuid"}


@pytest.mark.timeout(30)
def test_overridden_and_compat_methods_are_described_as_any_json(make_controller):
    custom = Override(Solve, store="memory://")
    try:
        compat = make_controller(Solve, compat="0.1")
        app = _app((custom, ("/custom", "/custom/<string:uuid>")), (compat, ("/old",)))
        document = openapi_document(app)
        validate(document)
        paths = document["paths"]
        assert set(paths["/custom"]) == {"get", "post", "put", "patch", "delete"}
        assert paths["/custom"]["post"]["responses"]["default"]["content"]["application/json"]["schema"] == {}
        assert "200" in paths["/custom"]["get"]["responses"]  # not overridden: the default answer
        assert "default" in paths["/custom"]["put"]["responses"]
        assert all("default" in op["responses"] for op in paths["/old"].values())
    finally:
        custom.shutdown()


@pytest.mark.timeout(30)
def test_apps_without_resources_and_other_views():
    app = Flask("plain")

    @app.get("/hello")
    def hello() -> str:
        return "hi"

    document = openapi_document(app)
    validate(document)
    assert document["paths"] == {}


# -- schemathesis against the example app -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_example_app_conforms_to_its_document(tmp_path, pool):
    """Generated requests (valid and invalid ones, and POST → GET → DELETE sequences) against
    ``examples/app.py`` on 127.0.0.1: no 500, and every answer's status, content type, headers and
    body as the document declares."""
    import hypothesis
    import requests
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance, response_headers_conformance, response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance]
    port = free_port()
    server = pool.start(python(str(TESTS / "openapi_app.py")), cwd=tmp_path, port=port,
                        log_path=tmp_path / "server.log", ready_path="/openapi.json",
                        env={"PORT": str(port), "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3"})
    document = requests.get(server.base + "/openapi.json", timeout=10).json()
    validate(document)
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=server.base)
    settings = hypothesis.settings(deadline=None, database=None, derandomize=True, print_blob=False,
                                   suppress_health_check=list(hypothesis.HealthCheck),
                                   phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])

    for mode, examples in ((GenerationMode.POSITIVE, 120), (GenerationMode.NEGATIVE, 60)):
        @hypothesis.given(case=schema.as_strategy(generation_mode=mode))
        @hypothesis.settings(settings, max_examples=examples)
        def call(case: Any) -> None:
            case.call_and_validate(base_url=server.base, checks=checks, timeout=15)

        call()

    # POST → GET → DELETE → GET of the task the POST queued (a generated uuid when it queued none), so
    # that tasks in every state are read and stopped. Each case is drawn whatever the answers are:
    # generation must not depend on the server's state.
    post, item = schema["/primes"]["POST"], schema["/primes/{uuid}"]

    @hypothesis.given(posted=post.as_strategy(), read=item["GET"].as_strategy(),
                      stop=item["DELETE"].as_strategy())
    @hypothesis.settings(settings, max_examples=30)
    def sequence(posted: Any, read: Any, stop: Any) -> None:
        response = posted.call_and_validate(base_url=server.base, checks=checks, timeout=15)
        body = response.json()
        uuid = body.get("uuid") or next((t["uuid"] for t in body.get("tasks", [])), None)
        for case in (read, stop, read):
            if uuid is not None:
                case.path_parameters["uuid"] = uuid
            case.call_and_validate(base_url=server.base, checks=checks, timeout=15)

    sequence()
    assert not unexpected_tracebacks(server.log()), server.log()
