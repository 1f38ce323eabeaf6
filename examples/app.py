"""A fuller example: typed arguments, progress, an item URL, a timeout, a memory limit and the extension.

Run it with ``python examples/app.py`` (the dev server on http://127.0.0.1:5000; the dashboard is at
http://127.0.0.1:5000/mpc/), or
under gunicorn with ``gunicorn -w 2 -b 127.0.0.1:8000 --chdir examples app:app``.
"""
import logging
import math
import os
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")


class PrimeCount(MetaMPTask, task_name="prime-count"):
    """Count the primes below ``limit``, reporting progress as it goes."""

    def execute(self, limit: int = 100_000, chunks: int = 20, pause: float = 0.0) -> dict:
        found = 0
        step = max(1, limit // chunks)
        for start in self.track(range(0, limit, step)):  # publishes percent and honours stop requests
            found += sum(1 for n in range(start, min(start + step, limit)) if _is_prime(n))
            self.upload_status({"checked_below": min(start + step, limit), "found": found})
            time.sleep(pause)
        self.logger.info("%d primes below %d", found, limit)
        return {"limit": limit, "primes": found}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


class PrimeController(MetaMPController, controller_name="primes"):
    pass


#: The extension: MPC_* settings, /mpc/health, the task API under /mpc/api/, the dashboard at /mpc/, and `flask mpc`.
mpc = MultiprocessController()
primes = PrimeController(PrimeCount, max_num_process=2, max_num_queue=100, timeout=600, stop_grace=5,
                         max_memory=512 * 1024 * 1024)

# Run as a script, an app's instance folder would be the working directory's (Flask cannot find the package of
# __main__); naming it keeps `python examples/app.py`, `flask --app app mpc ...` and cron jobs on one store.
app = Flask(__name__, instance_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance"))
api = Api(app)
api.add_resource(MetaMPResource, "/primes", "/primes/<string:uuid>", resource_class_args=(primes,))
mpc.init_app(app)  # tasks live in instance/mpc-tasks.sqlite3 unless MPC_STORE_URL says otherwise

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
