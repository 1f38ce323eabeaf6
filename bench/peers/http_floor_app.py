"""The HTTP floor's app: the same server stack as this project's HTTP rows, with a handler that does
no work at all.

Flask + flask-restful, the same routes (``/tasks`` and ``/tasks/<id>``), the same request and answer
shapes: a POST "runs" the task inline (``x + y``, or the handler's own ``time.time()`` for the
dispatch workload), puts it in a dict (the "queue") and answers ``202 {"uuid": ...}``; a GET (with
or without ``?wait=``) answers the stored task at once. With ``gunicorn -w 2`` each worker has its own
dict, so the result also travels in the id and a GET on the other worker finds it there. A POST with
``?wait=`` answers ``200`` with the finished task, as this project's does when its task ended in time.

Whatever a row of this project costs beyond this floor is its own: the controller, the store, the
fork server and the task processes; what this floor costs is Flask's, the server's and the client's.

Dev server: ``python bench/peers/http_floor_app.py`` (port from ``PORT``); gunicorn:
``gunicorn bench.peers.http_floor_app:app``.
"""
import json
import os
import threading
import time
import uuid as uuid_module

from flask import Flask, request
from flask_restful import Api, Resource

_tasks: dict = {}
_lock = threading.Lock()


class NoOp(Resource):
    def post(self):
        body = request.get_json(force=True)
        result = time.time() if body.get("op") == "stamp" else body.get("x", 0) + body.get("y", 0)
        task_id = f"{uuid_module.uuid4().hex}_{json.dumps(result)}"
        task = {"uuid": task_id, "status": "succeeded", "result": result}
        with _lock:
            _tasks[task_id] = task
            if len(_tasks) > 100_000:  # bounded, like a queue that drains
                _tasks.clear()
        if request.args.get("wait") is not None:
            return task, 200
        return {"uuid": task_id}, 202

    def get(self, uuid):
        with _lock:
            task = _tasks.get(uuid)
        if task is None:  # posted to the other gunicorn worker
            task = {"uuid": uuid, "status": "succeeded", "result": json.loads(uuid.partition("_")[2])}
        return task, 200


app = Flask(__name__)
Api(app).add_resource(NoOp, "/tasks", "/tasks/<string:uuid>")

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
