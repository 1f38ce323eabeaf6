"""``examples/app.py`` served on 127.0.0.1:$PORT with its OpenAPI document at ``/openapi.json``.

The schemathesis test runs it as a subprocess. The example is loaded as it is; only its
waits and its task timeout are shortened (``?wait=`` answers within a second, a task
runs at most two, an event or log stream ends after a second), so that generated requests
for huge prime counts, and for the streams, keep the run quick.
The document is served from a plain route, as the extension will serve it.
"""
from __future__ import annotations

import os

from flask import jsonify

from flask_multiprocess_controller.http.openapi import openapi_document

from serverproc import load_example_app


example = load_example_app()
example.primes.max_wait = 1.0
example.primes.timeout = 2.0
app = example.app
app.config["MPC_MAX_WAIT"] = 1.0


@app.get("/openapi.json")
def openapi_json():
    return jsonify(openapi_document(app, title="primes example"))


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
