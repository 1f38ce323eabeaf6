"""schemathesis over every operator URL (``/mpc/...``) and the example's resource, in-process: no 500.

The README's example app (``examples/app.py``) is loaded on a SQLite store in the test's folder and
called through its WSGI interface (no server, no socket). Its ``/mpc/openapi.json`` describes the
resource (``/primes``) and the extension's URLs (the task API, health, schedules, log lines and their
follow stream, the event stream); the document itself and the dashboard's files are left out of it on
purpose (they are no operations of the API), so this test describes them itself, and checks that
together the two cover every URL the extension registers.

Each operation gets schemathesis's coverage cases (every parameter's boundaries, wrong types, missing
required values), then generated valid and invalid requests (its positive and negative modes); a path's
``uuid`` is either generated or one of real tasks in several states, so that item URLs are exercised on
tasks that exist and not only answered 404. Then every numeric query option gets numbers no client
should send (past 64 bits, past a float, NaN) and every method that reads a body gets a body nested
past any parser's recursion and one over the size limit. The check is schemathesis's
``not_a_server_error``: bad input must get a 4xx, never a 500 (and, for the hostile requests, a short
JSON ``message``). The example app's conformance to its document (status codes,
headers, bodies) is checked over real HTTP in ``test_openapi.py``.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator

import pytest

from serverproc import load_example_app

#: Generated examples per operation and generation mode, and coverage cases per operation at most (about
#: 25 operations: the run stays at a few hundred requests in total).
EXAMPLES = {"positive": 8, "negative": 4}
COVERAGE = 12

_TEXT = {"200": {"description": "The answer."}}


def _operator_paths_left_out(prefix: str) -> dict[str, Any]:
    """The extension's URLs that ``/mpc/openapi.json`` leaves out, described for the generator."""
    def get(*parameters: dict[str, Any]) -> dict[str, Any]:
        return {"get": {"parameters": list(parameters), "responses": _TEXT}}

    paths = {
        f"{prefix}/openapi.json": get(),
        f"{prefix}/": get(),
        f"{prefix}/dashboard.js": get(),
        f"{prefix}/dashboard.css": get(),
        f"{prefix}/mpc-progress.js": get(),
        f"{prefix}/share.css": get(),
    }
    for path, item in paths.items():
        item["get"]["operationId"] = "mpc" + path[len(prefix):].replace("/", ".").replace("{", "").replace("}", "")
    return paths


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Any]:
    """The example app on a SQLite store of its own; streams and waits end within a second, a task within two."""
    monkeypatch.setenv("MPC_STORE_URL", f"sqlite:///{tmp_path}/tasks.sqlite3")
    module = load_example_app()
    module.primes.max_wait = 1.0
    module.primes.timeout = 2.0
    module.app.config["MPC_MAX_WAIT"] = 0.2
    try:
        yield module
    finally:
        module.primes.shutdown()
        sys.modules.pop("app", None)


def _real_tasks(module: Any) -> list[str]:
    """Tasks in several states: ended, stopped while queued, and queued or running."""
    primes = module.primes
    done = primes.submit(limit=10, chunks=1)
    primes.wait(done, timeout=30)
    failing = primes.submit(limit=-5, chunks=0)  # range() step 0 raises: a failed task
    primes.wait(failing, timeout=30)
    long = [primes.submit(limit=10**9, chunks=10**6, pause=0.01) for _ in range(3)]
    primes.stop(long[-1])
    return [done, failing, *long]


#: Query values that are no sensible number: past 64 bits, past a float, not a number.
HOSTILE_NUMBERS = (str(2**64), str(-2**64), "1e400", "nan", "-inf")

#: Bodies no client should send: nested past any parser's recursion, and over the body size limit.
HOSTILE_BODIES = {"deep": "[" * 100_000 + "]" * 100_000, "large": '{"x": "' + "a" * (2 * 2**20) + '"}'}


def _hostile_requests(document: dict[str, Any], real: list[str]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, url, test-client keywords) of requests with an out-of-range number in each numeric query
    option, and with each hostile body to each method that reads one; required options filled in validly."""
    parameters = document.get("components", {}).get("parameters", {})

    def resolve(parameter: dict[str, Any]) -> dict[str, Any]:
        return parameters[parameter["$ref"].rsplit("/", 1)[1]] if "$ref" in parameter else parameter

    for template, item in document["paths"].items():
        url = template.replace("{uuid}", real[0]).replace("{host}", "some-host")
        for method, operation in item.items():
            if method == "parameters":
                continue
            query = [resolve(p) for p in operation.get("parameters", []) if resolve(p)["in"] == "query"]
            required = {p["name"]: (p["schema"].get("enum") or ["primes"])[0] for p in query if p.get("required")}
            for parameter in query:
                if parameter["schema"].get("type") in ("integer", "number"):
                    for value in HOSTILE_NUMBERS:
                        yield method, url, {"query_string": {**required, parameter["name"]: value}}
            if method in ("post", "patch", "delete", "put"):
                for body in HOSTILE_BODIES.values():
                    yield method, url, {"query_string": required, "data": body, "content_type": "application/json"}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_server_error_on_any_operator_url_or_the_example_resource(example: Any) -> None:
    """Coverage cases (each parameter's boundaries and wrong types), then generated valid and invalid
    requests, then hostile numbers and bodies: every answer below 500, and a hostile request's 4xx a short
    JSON ``message``."""
    import hypothesis
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    app = example.app
    client = app.test_client()
    document = client.get("/mpc/openapi.json").get_json()
    prefix = "/mpc"
    document["paths"].update(_operator_paths_left_out(prefix))

    # Every URL the app serves under the prefix, and the example's resource, is in the document.
    templates = {rule.rule.replace("<uuid>", "{uuid}").replace("<path:host>", "{host}")
                 .replace("<string:uuid>", "{uuid}").replace("<name>", "{name}").replace("<path:name>", "{name}")
                 for rule in app.url_map.iter_rules()
                 if rule.endpoint != "static"}
    assert templates - set(document["paths"]) == set(), "URLs the test does not call"

    real = _real_tasks(example)
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app
    settings = hypothesis.settings(deadline=None, database=None, derandomize=True, print_blob=False,
                                   suppress_health_check=list(hypothesis.HealthCheck),
                                   phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    failures: list[str] = []
    calls = 0

    def call(case: Any, task: Any = None) -> None:
        nonlocal calls
        if task is not None and "uuid" in (case.path_parameters or {}):
            case.path_parameters["uuid"] = task
        calls += 1
        case.call_and_validate(app=app, checks=[not_a_server_error])

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        coverage = schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                              generation_config=schema.config.generation)
        for number, case in zip(range(COVERAGE), coverage):
            try:
                call(case, real[number % len(real)] if number % 2 else None)
            except Exception as exc:
                failures.append(f"{operation.label} (coverage): {exc}")

        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode), task=st.sampled_from([None, *real]))
            @hypothesis.settings(settings, max_examples=EXAMPLES[mode.value])
            def fuzz(case: Any, task: Any) -> None:
                call(case, task)

            try:
                fuzz()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing of the operation can be made invalid
            except Exception as exc:  # every operation is run; the failures are reported together
                failures.append(f"{operation.label} ({mode.value}): {exc}")

    for method, url, keywords in _hostile_requests(document, real):
        calls += 1
        response = client.open(url, method=method.upper(), **keywords)
        shown = f"{method.upper()} {url} {str(keywords.get('query_string'))[:80]} body {len(keywords.get('data', ''))} B"
        if response.status_code >= 500:
            failures.append(f"{shown}: {response.status_code}")
        elif response.status_code >= 400:
            body = response.get_json(silent=True)
            if not isinstance(body, dict) or "message" not in body or len(response.data) > 4096:
                failures.append(f"{shown}: {response.status_code} {response.data[:200]!r} ({len(response.data)} B)")
    print(f"{calls} requests")
    assert calls >= 300
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures)
