"""The app of ``bench/cross_host.py``: one controller whose task checkpoints until told to end.

Dev server: ``python bench/peers/cross_host_app.py`` (port from ``PORT``); gunicorn:
``gunicorn bench.peers.cross_host_app:app``. The store and the host's name come from the package's
own variables, ``MPC_STORE_URL`` and ``MPC_HOST_ID``, so two processes started with different
``MPC_HOST_ID`` values on one Redis URL are two hosts of one deployment.
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

#: Seconds the task sleeps between two checkpoints, unless told otherwise.
CHECKPOINT_EVERY = 0.01
#: Seconds a task runs at most, so that nothing outlives a benchmark that lost track of it.
LONGEST = 600.0


class Beat(MetaMPTask, task_name="beat"):
    """Checkpoints every ``every`` seconds until the file ``gate`` exists (then succeeds) or it is stopped."""

    def execute(self, gate: str = "", every: float = CHECKPOINT_EVERY) -> dict:
        self.upload_status({"pid": os.getpid(), "host": os.environ.get("MPC_HOST_ID")})
        deadline = time.monotonic() + LONGEST
        while time.monotonic() < deadline:
            time.sleep(every)
            self.checkpoint()
            if gate and os.path.exists(gate):
                return {"ended": time.time(), "host": os.environ.get("MPC_HOST_ID")}
        raise TimeoutError(f"no gate {gate!r} within {LONGEST:g} s")


class BeatController(MetaMPController, controller_name="cross-host"):
    """Named, so that every serving process on the store shares its tasks."""


controller = BeatController(Beat, max_num_process=int(os.environ.get("BENCH_MAX_NUM_PROCESS", "2")))
app = Flask(__name__)
# Event streams (<prefix>/events) last as long as a benchmark window, not the default 25 s.
app.config["MPC_MAX_WAIT"] = float(os.environ.get("BENCH_MAX_WAIT", "600"))
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
MultiprocessController(app)

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
