"""The app of ``bench/scale_out.py``: one controller of tiny tasks, reused workers, on the store and
host named by the package's own variables (``MPC_STORE_URL``, ``MPC_HOST_ID``).

Dev server: ``python bench/peers/scale_app.py`` (port from ``PORT``; slots from ``BENCH_SLOTS``).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from flask import Flask  # noqa: E402
from flask_restful import Api  # noqa: E402

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask  # noqa: E402


class Tiny(MetaMPTask, task_name="tiny"):
    """Returns the time of its first line (and ``x + 1``): as little work as a task can do."""

    def execute(self, x: int = 0) -> dict:
        return {"began": time.time(), "value": x + 1}


class ScaleController(MetaMPController, controller_name="scale-out"):
    """Named, so that every serving process on the store shares its tasks."""


controller = ScaleController(Tiny, max_num_process=int(os.environ.get("BENCH_SLOTS", "2")), max_tasks_per_child=0)
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
