"""The app ``bench/soak.py`` serves under gunicorn: one controller, ``soak``, whose tasks report progress a
few times and record each run they make.

Every run appends two lines to the file ``SOAK_RECORDS`` (one ``write`` each, ``O_APPEND``, so lines of
concurrent runs never interleave): ``S <uuid> <sid> <pid> <time>`` when ``execute`` begins and
``E <uuid> <sid> <pid> <time>`` when it returns. A task that runs twice has two ``S`` lines; a task adopted
by another serving process (the same run, in the same process) has one. ``sid`` is the client's submit
id, an argument of the task, so that two tasks made by one submit are found.

``SOAK_CONFIG`` (JSON) sets ``max_num_process``, ``retention`` (seconds), ``restartable``, the store's
``max_events`` and ``event_retention`` (compressed, as the retention is: see ``soak.py``) and the
controller's ``idempotency_ttl``. The store
is ``MPC_STORE_URL``; the extension serves ``/mpc/health`` and ``/mpc/api/tasks``, which the soak reads.
"""
from __future__ import annotations

import json
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.store.redis import RedisStore

CONFIG = json.loads(os.environ.get("SOAK_CONFIG") or "{}")
RECORDS = os.environ.get("SOAK_RECORDS", "soak-runs.log")
# The store is made from MPC_STORE_URL (so that hand-over can reopen it): its bounds are set on the class.
RedisStore.max_events = int(CONFIG.get("max_events", RedisStore.max_events))
RedisStore.event_retention = float(CONFIG.get("event_retention", RedisStore.event_retention))


def record(kind: str, uuid: str, sid: str) -> None:
    """Append one run record (a single O_APPEND write: atomic against the other task processes)."""
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {uuid} {sid} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


class SoakTask(MetaMPTask, task_name="soak"):
    restartable = bool(CONFIG.get("restartable", False))

    def execute(self, sid: str, steps: int = 6, step: float = 0.1, pad: str = "") -> dict:
        """Report ``steps`` progress values, ``step`` seconds apart; ``pad`` only makes the arguments bigger."""
        record("S", self.task_id, sid)
        for n in range(1, steps + 1):
            self.checkpoint()
            self.upload_status({"step": n, "of": steps})
            time.sleep(step)
        record("E", self.task_id, sid)
        return {"sid": sid, "pid": os.getpid()}


class SoakController(MetaMPController, controller_name="soak"):
    pass


controller = SoakController(SoakTask, max_num_process=int(CONFIG.get("max_num_process", 4)), stop_grace=2,
                            retention=float(CONFIG.get("retention", 7 * 24 * 3600)),
                            idempotency_ttl=float(CONFIG.get("idempotency_ttl", 24 * 3600)))
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
MultiprocessController(app)
