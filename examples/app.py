"""A fuller example: typed arguments, progress, an item URL, a timeout, a memory limit and the extension.

Run it with ``python examples/app.py`` (the dev server on http://127.0.0.1:5000, or on the port ``PORT``
names: ``PORT=8080 python examples/app.py``; the dashboard is at http://127.0.0.1:5000/mpc/), or
under gunicorn with ``gunicorn -w 2 -b 127.0.0.1:8000 --chdir examples app:app``.
"""
import json
import logging
import math
import os
import secrets
import time

from flask import Flask
from flask_restful import Api

from flask_multiprocess_controller import (
    FinishRequested, MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController,
)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s %(levelname)s %(message)s")


class PrimeCount(MetaMPTask, task_name="prime-count"):
    """Count the primes below ``limit``, reporting progress as it goes.

    Every few seconds it saves how far it got (``save_state``): if its server dies or shuts down, the
    task is queued again and the next attempt goes on from there (``self.state``) instead of restarting.
    Asked to finish now (``DELETE /primes/<uuid>?finish=true``, or "Finish now" on the dashboard), it
    returns the count so far: the task ends ``stopped`` with that result.
    """

    #: Seconds between two saves of how far the count got.
    SAVE_EVERY = 2.0

    def execute(self, limit: int = 100_000, chunks: int = 20, pause: float = 0.0) -> dict:
        resumed = self.state or {}  # what an earlier attempt saved, if any
        found, done_below = resumed.get("found", 0), resumed.get("checked_below", 0)
        if resumed:
            self.logger.info("resuming from %d (%d primes found below it)", done_below, found)
        step = max(1, limit // chunks)
        next_save = time.monotonic() + self.SAVE_EVERY
        try:
            for start in self.track(range(0, limit, step)):  # publishes percent and honours stop requests
                if start < done_below:
                    continue  # counted by an earlier attempt
                found += sum(1 for n in range(start, min(start + step, limit)) if _is_prime(n))
                done_below = min(start + step, limit)
                reached = {"checked_below": done_below, "found": found}
                self.upload_status(reached)
                if time.monotonic() >= next_save:
                    self.save_state(reached)
                    next_save = time.monotonic() + self.SAVE_EVERY
                time.sleep(pause)
        except FinishRequested:  # asked to finish now: the count so far is the answer
            self.logger.info("finishing early: %d primes below %d", found, done_below)
            return {"limit": limit, "primes": found, "checked_below": done_below}
        self.logger.info("%d primes below %d", found, limit)
        self.save_artifact("summary.json", json.dumps({"limit": limit, "primes": found}).encode(),
                           content_type="application/json")  # GET /primes/<uuid>/artifacts/summary.json
        return {"limit": limit, "primes": found}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _instance_secret(folder: str) -> str:
    """The secret kept in ``folder/secret-key``, made on first use (the first of several workers to get there
    writes it; the others read it)."""
    path = os.path.join(folder, "secret-key")
    os.makedirs(folder, exist_ok=True)
    try:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as made:
            made.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    for _ in range(50):  # another worker may be writing it
        with open(path) as kept:
            secret = kept.read().strip()
        if secret:
            return secret
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty: delete it, or set SECRET_KEY.")


class PrimeController(MetaMPController, controller_name="primes"):
    pass


#: The extension: MPC_* settings, /mpc/health, the task API under /mpc/api/, the dashboard at /mpc/, and `flask mpc`.
mpc = MultiprocessController()
primes = PrimeController(PrimeCount, max_num_process=2, max_num_queue=100, timeout=600, stop_grace=5,
                         max_memory=512 * 1024 * 1024)

# Run as a script, an app's instance folder would be the working directory's (Flask cannot find the package of
# __main__); naming it keeps `python examples/app.py`, `flask --app app mpc ...` and cron jobs on one store.
app = Flask(__name__, instance_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance"))
# Signs share links (POST /primes?share=3600): SECRET_KEY from the environment, else one kept in the instance
# folder, so that every worker and restart signs alike.
app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY") or _instance_secret(app.instance_path)
api = Api(app)
# /primes, /primes/<uuid>, and /primes/<uuid>/artifacts[/<name>] for the files a task saved.
api.add_resource(MetaMPResource, *MetaMPResource.urls("/primes"), resource_class_args=(primes,))
mpc.init_app(app)  # tasks live in instance/mpc-tasks.sqlite3 unless MPC_STORE_URL says otherwise

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
