"""The server the client tests talk to, run as ``python client_app.py`` on 127.0.0.1:$PORT.

- ``/jobs`` (and ``/jobs/<uuid>``): two processes, an unbounded queue.
- ``/tight``: one process and one queued task at most, mounted seed-style (no item URL), for 429s.
- ``/secure``: answers 401 unless the request says ``Authorization: Bearer s3cret``.
- ``/flaky``: a controller without a task whose GET answers 503 with ``Retry-After: 1`` to the
  first two reads of each uuid, then a finished task object.
- ``/mpc/...``: the extension's URLs (a task's logs, its rerun).
- ``/moved``: redirects (308) to ``/jobs`` on the same origin.
- ``/elsewhere``: redirects (307) to ``/record`` on another origin (``localhost`` rather than
  ``127.0.0.1``), which records the headers and body of what reaches it; ``/recorded`` lists them.
- the extension's URLs under ``/mpc`` (where the client looks up short uuid prefixes).
"""
from __future__ import annotations

import collections
import functools
import os
import threading
import time
from typing import Any, Callable

from flask import Flask, redirect, request
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController

TOKEN = "Bearer s3cret"


class Job(MetaMPTask):
    """Sleep ``steps`` times ``delay`` seconds, tracking progress; fail when told to."""

    def execute(self, n: int = 0, steps: int = 0, delay: float = 0.0, fail: bool = False) -> dict:
        for _ in self.track(range(steps)):
            time.sleep(delay)
        if fail:
            raise ValueError("asked to fail")
        return {"n": n}


def require_token(method: Callable[..., Any]) -> Callable[..., Any]:
    """A ``decorator=``: refuse requests without the token, as an app's own auth would."""

    @functools.wraps(method)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if request.headers.get("Authorization") != TOKEN:
            return {"message": "Send 'Authorization: Bearer <token>'."}, 401
        return method(self, *args, **kwargs)

    return checked


class Jobs(MetaMPController, controller_name="jobs"):
    pass


class Tight(MetaMPController, controller_name="tight"):
    pass


class Secure(MetaMPController, controller_name="secure", decorator=require_token):
    pass


_reads: collections.Counter[str] = collections.Counter()
_reads_lock = threading.Lock()  # guards _reads (the dev server answers on several threads)


class Flaky(MetaMPController, controller_name="flaky"):
    def get(self, **kwargs: Any) -> Any:
        uuid = kwargs.get("uuid", "")
        with _reads_lock:
            _reads[uuid] += 1
            reads = _reads[uuid]
        if reads <= 2:
            return {"message": "The task store is unreachable."}, 503, {"Retry-After": "1"}
        return {"uuid": uuid, "status": "succeeded", "reads": reads}


jobs = Jobs(Job, max_num_process=2, stop_grace=0.5)
tight = Tight(Job, max_num_process=1, max_num_queue=1, stop_grace=0.5)
secure = Secure(Job, max_num_process=1, stop_grace=0.5)
flaky = Flaky(None)

app = Flask(__name__)
api = Api(app)
api.add_resource(MetaMPResource, "/jobs", "/jobs/<string:uuid>", endpoint="jobs", resource_class_args=(jobs,))
api.add_resource(MetaMPResource, "/tight", endpoint="tight", resource_class_args=(tight,))
api.add_resource(MetaMPResource, "/secure", "/secure/<string:uuid>", endpoint="secure",
                 resource_class_args=(secure,))
api.add_resource(MetaMPResource, "/flaky", endpoint="flaky", resource_class_args=(flaky,))
MultiprocessController(app)


@app.get("/ready")
def ready() -> str:
    return "ok"


_recorded: list[dict[str, Any]] = []


@app.route("/moved", methods=["GET", "POST"])
def moved() -> Any:
    return redirect("/jobs", 308)


@app.route("/elsewhere", methods=["GET", "POST"])
def elsewhere() -> Any:
    return redirect(f"http://localhost:{os.environ['PORT']}/record", 307)


@app.route("/record", methods=["GET", "POST"])
def record() -> Any:
    _recorded.append({"headers": dict(request.headers), "body": request.get_data(as_text=True)})
    return {"uuid": "not-a-task", "tasks": []}


@app.get("/recorded")
def recorded() -> Any:
    return {"requests": _recorded}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
