"""The app of ``bench/long_tasks.py`` for this project: one task that runs for ``seconds`` and reports
its progress ``rate`` times a second, mounted at ``/tasks`` and ``/tasks/<uuid>``.

Served by gunicorn (``gunicorn bench.peers.long_mpc_app:app``). The store comes from the package's own
``MPC_STORE_URL``; the slots (``max_num_process``, across every serving process) from ``BENCH_SLOTS``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from flask import Flask  # noqa: E402
from flask_restful import Api  # noqa: E402

from bench.peers.long_task_body import progress_value, steps  # noqa: E402
from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask  # noqa: E402


class LongTask(MetaMPTask, task_name="long"):
    """Runs ``seconds`` seconds, calling ``upload_status`` ``rate`` times a second; returns its step count."""

    def execute(self, seconds: float = 30.0, rate: float = 10.0) -> int:
        count = 0
        for i in steps(seconds, rate):
            self.upload_status(progress_value(i))
            count = i
        return count


class LongController(MetaMPController, controller_name="long"):
    """Named, so that every serving process shares its tasks and its slots."""


controller = LongController(LongTask, max_num_process=int(os.environ.get("BENCH_SLOTS", "16")))
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
