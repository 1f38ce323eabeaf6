"""An app whose tasks run for a while reporting progress, for the hand-over tests (served by gunicorn or the
dev server). The store comes from ``MPC_STORE_URL``; ``APP_CONFIG`` (JSON) sets a few controller options."""
from __future__ import annotations

import json
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask

CONFIG = json.loads(os.environ.get("APP_CONFIG") or "{}")


class Work(MetaMPTask):
    restartable = bool(CONFIG.get("restartable", False))

    def execute(self, seconds: float = 20.0, step: float = 0.2, tag: str = "", resume: bool = False) -> dict:
        """Count steps for ``seconds``; with ``resume``, save the count and continue from a saved one."""
        started = time.time()
        n = resumed_from = (self.state or {}).get("n", 0) if resume else 0
        while time.time() - started < seconds:
            self.checkpoint()
            n += 1
            self.upload_status({"n": n, "pid": os.getpid()})
            if resume and n % 3 == 0:
                self.save_state({"n": n})
            if n % 5 == 0:
                self.logger.info("step %d of %s", n, tag)
                print(f"printed step {n}", flush=True)
            time.sleep(step)
        return {"n": n, "pid": os.getpid(), "tag": tag, "resumed_from": resumed_from}


class WorkController(MetaMPController, controller_name="work"):
    pass


controller = WorkController(Work, max_num_process=CONFIG.get("max_num_process", 8),
                            max_tasks_per_child=CONFIG.get("max_tasks_per_child", 1),
                            stop_grace=CONFIG.get("stop_grace", 1.0), lease=CONFIG.get("lease", 3))
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]))
