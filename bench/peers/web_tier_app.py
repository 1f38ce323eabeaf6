"""The app of ``bench/web_tier.py``: long tasks that report progress ten times a second.

Dev server: ``python bench/peers/web_tier_app.py`` (port from ``PORT``); gunicorn:
``gunicorn bench.peers.web_tier_app:app``. The store comes from ``MPC_STORE_URL``; the slots of each
serving process from ``BENCH_MAX_NUM_PROCESS`` (16 by default).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from flask import Flask  # noqa: E402
from flask_restful import Api  # noqa: E402

from flask_multiprocess_controller import (  # noqa: E402
    MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController,
)


class Report(MetaMPTask, task_name="report"):
    """Runs ``seconds`` seconds, calling ``upload_status`` every ``every`` seconds with its wall clock.

    The value carries the moment it was made (``t``, UNIX time), so a reader tells how old what it
    reads is.
    """

    def execute(self, seconds: float = 60.0, every: float = 0.1) -> int:
        count = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            count += 1
            self.upload_status({"n": count, "t": time.time()})
            time.sleep(every)
        return count


class ReportController(MetaMPController, controller_name="web-tier"):
    """Named, so that every serving process on the store shares its tasks."""


controller = ReportController(Report, max_num_process=int(os.environ.get("BENCH_MAX_NUM_PROCESS", "16")))
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
MultiprocessController(app)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
