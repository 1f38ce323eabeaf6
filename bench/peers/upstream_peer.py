"""The upstream release, Flask-Multiprocess-Controller 0.1.1 from PyPI, driven over HTTP.

0.1.1 pins Flask 1.1 and Werkzeug 1.0, and shares its import name with this project, so it runs in
a virtual environment of its own, ``bench/.venv-upstream``, made on first use by
:func:`ensure_upstream_venv`. Its server (:mod:`bench.peers.upstream_app`) is started with that
environment's Python in isolated mode (``-I``: no ``PYTHONPATH``, no script directory on
``sys.path``) from the peer's work directory, and the peer checks from the server's log that
``flask_multiprocess_controller`` was imported from the environment. The client (``requests``)
runs here.

How the interface maps onto 0.1.1's API (one resource, ``/tasks``, JSON bodies on every method):

- submit: ``POST {"op": ..., "ticket": ..., args...}``; the body becomes ``execute``'s keyword
  arguments; the answer carries upstream's ``uuid``. The handle is ``(uuid, ticket)``.
- result: 0.1.1 keeps no result and its GET cannot tell a queued task from an ended one ("No
  process linked to this uuid"). The app stores each value under the client's ticket and its GET
  answers with ``result`` once it is stored (see the app's docstring); :meth:`result` polls
  ``GET {"uuid", "ticket"}`` every :data:`POLL` seconds until ``result`` is there. A task seen
  running and then "not linked" without a result has failed; one never seen running times out.
- stop (checkpointing task): ``DELETE {"uuid"}`` sets the task's stop event; the task calls
  0.1.1's ``set_checkpoint()`` every ``CHECKPOINT_EVERY``, which raises ``AbortException``.
  Stopped = GET says "No process linked" again (the controlling thread has joined the process).
- stop_ignoring is not taken part in: DELETE only sets the event, and 0.1.1 has no terminate or
  kill, so a task that never checks runs until the server exits.
- progress: ``upload_status(step)`` per step, 0.1.1's pipe to the controlling thread; only a GET
  drains that pipe. ``upload_status`` holds the task's lock while it sends, and GET takes the same
  lock before draining, so once the pipe fills between two GETs the task blocks in the write with
  the lock held and that GET, and every later one, blocks on the lock: a deadlock, which shows
  here as a GET without an answer within :data:`HTTP_TIMEOUT` (``TimeoutError``).

Known faults of 0.1.1 that show here, under load (burst): a task can end before the queue
listener has recorded which controlling thread runs it; the controlling thread then dies on a
``KeyError`` before it signals the free slot, so the slot is lost for good and every later GET of
that uuid fails with HTTP 500. The client retries 500s (counted in :attr:`UpstreamPeer.retried_errors`)
and finds the stored value all the same, but once both slots are lost the queue never moves
again and the waits end in ``TimeoutError``: a stall shows as an error, not as a hang. (The window
is the listener thread waiting for the GIL, so the client's polling makes it likelier.) Also, the
waiting queue is a priority queue of ``(0, uuid)``, so queued tasks start in random order, and
its start signal (a ``threading.Event``) coalesces, so fewer than 2 tasks may run while tasks wait.
"""
from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import requests

from . import base
from .base import Peer, PeerUnavailable

#: The virtual environment 0.1.1 runs in (bench/.venv* is ignored by git).
VENV_DIR = base.BENCH_DIR / ".venv-upstream"
#: What goes into it: the release, plus the pins that make Flask 1.1 import on Python 3.11.
REQUIREMENTS = ("flask-multiprocess-controller==0.1.1", "Jinja2<3", "MarkupSafe==2.0.1",
                "itsdangerous<2", "click<8")
APP = Path(__file__).resolve().parent / "upstream_app.py"
#: Seconds between two GETs of one waiting client.
POLL = 0.002
#: Seconds one HTTP request may take.
HTTP_TIMEOUT = 10.0

_PROBE = """
import json, sys
import flask, werkzeug, flask_multiprocess_controller as m
print(json.dumps({"file": m.__file__, "flask-multiprocess-controller": m.__version__,
                  "flask": flask.__version__, "werkzeug": werkzeug.__version__}))
"""


def _probe(venv: Path) -> Optional[dict]:
    """Versions inside ``venv`` if 0.1.1 imports there (from the venv itself), else ``None``."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([str(python), "-I", "-c", _PROBE], cwd=cwd, capture_output=True,
                              text=True, timeout=60)
    if done.returncode != 0:
        return None
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if found.pop("flask-multiprocess-controller") != "0.1.1" or not found.pop("file").startswith(str(venv)):
        return None
    return {"flask-multiprocess-controller": "0.1.1", **found}


def ensure_upstream_venv(venv: Path = VENV_DIR, log: Optional[Path] = None) -> dict:
    """Make sure ``venv`` holds 0.1.1 and importable pins; return its versions.

    Idempotent: does nothing when the environment already imports 0.1.1. Otherwise (re)creates it
    with ``python -m venv`` from the running interpreter's base Python and pip-installs
    :data:`REQUIREMENTS` (output to ``log``). A lock file keeps two runs from building it at once.
    """
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"bench{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _probe(venv)
        if found is not None:
            return found
        base_python = getattr(sys, "_base_executable", None) or sys.executable
        steps = [[base_python, "-m", "venv", "--clear", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                  *REQUIREMENTS]]
        with open(log or Path(tempfile.gettempdir()) / "upstream-venv.log", "a") as out:
            for argv in steps:
                try:
                    done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, timeout=600)
                except subprocess.TimeoutExpired:
                    raise PeerUnavailable(f"{' '.join(argv[:4])} took over 600 s") from None
                if done.returncode != 0:
                    raise PeerUnavailable(f"{' '.join(argv[:4])} failed ({done.returncode}); see {out.name}")
        found = _probe(venv)
        if found is None:
            raise PeerUnavailable(f"{venv} was built but flask_multiprocess_controller 0.1.1 does not import there")
        return found


#: Seconds without a result after which 0.1.1 counts as stalled (its tasks here take microseconds;
#: a burst of 300 ends within a few seconds when it does not stall).
STALL_TIMEOUT = 15.0


class UpstreamPeer(Peer):
    """Flask-Multiprocess-Controller 0.1.1 behind Flask 1.1's threaded development server."""

    key = "upstream"
    label = "upstream 0.1.1 (Flask 1.1 dev server)"
    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.STOP_CHECKPOINT, base.PROGRESS})

    def __init__(self, workdir: Path, python: Optional[str] = None) -> None:
        super().__init__(workdir, python)
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self._versions: dict = {}
        self._local = threading.local()
        #: HTTP 500 answers the client retried (0.1.1's bookkeeping races), for the log.
        self.retried_errors = 0

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._versions = ensure_upstream_venv(log=self.workdir / "venv-install.log")
        port = base.free_port()
        log = self.workdir / "server.log"
        run_dir = self.workdir / "run"
        run_dir.mkdir(exist_ok=True)
        # -I ignores PYTHONPATH (which spawn points at this repository) and keeps the script's own
        # directory off sys.path; the empty PYTHONPATH says the same to anything that looks.
        self.proc = base.spawn([str(VENV_DIR / "bin" / "python"), "-I", "-u", str(APP), "--port", str(port),
                                "--results", str(self.workdir / "results"),
                                "--checkpoint-every", str(base.CHECKPOINT_EVERY)],
                               log, cwd=run_dir, env={"PYTHONPATH": ""})
        base.wait_port(port, self.proc, log=log)
        loaded = next((line.split(": ", 1)[1] for line in log.read_text().splitlines()
                       if line.startswith("upstream-module: ")), "")
        if not loaded.startswith(str(VENV_DIR)):
            raise PeerUnavailable(f"the server imported flask_multiprocess_controller from {loaded!r}, not {VENV_DIR}")
        self.url = f"http://127.0.0.1:{port}/tasks"
        self.result(self.submit_add(1, 1))  # warm-up: the first fork pays nothing extra after this

    def close(self) -> None:
        base.stop_tree(self.proc)
        self.proc = None

    def recover(self) -> None:
        """After a stall (0.1.1's controlling threads die on a race), start a new server."""
        self.close()
        self.start()

    def versions(self) -> dict:
        return dict(self._versions)

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    # -- HTTP ---------------------------------------------------------------------------------
    def _call(self, method: str, body: dict) -> dict:
        """One request with a JSON body; the JSON answer (HTTP errors raise)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            answer = session.request(method, self.url, json=body, timeout=HTTP_TIMEOUT)
        except requests.Timeout:
            raise TimeoutError(f"{method} {body} got no answer within {HTTP_TIMEOUT:.0f} s "
                               "(the server's request thread is blocked)") from None
        answer.raise_for_status()
        return answer.json()

    def _submit(self, op: str, **kwargs: Any) -> tuple[str, str]:
        ticket = uuid.uuid4().hex
        answer = self._call("POST", {"op": op, "ticket": ticket, **kwargs})
        return answer["uuid"], ticket

    def _poll(self, handle: tuple[str, str], done, timeout: float, what: str) -> dict:
        """GET the task every :data:`POLL` s until ``done(answer, seen_running)`` is true."""
        task_uuid, ticket = handle
        deadline = time.monotonic() + timeout
        seen_running = False
        answer: dict = {}
        while True:
            try:
                answer = self._call("GET", {"uuid": task_uuid, "ticket": ticket})
            except requests.HTTPError as exc:
                if exc.response is None or exc.response.status_code != 500:
                    raise
                self.retried_errors += 1
            else:
                seen_running = seen_running or answer.get("msg", "").startswith("Process is running")
                if done(answer, seen_running):
                    return answer
            if time.monotonic() > deadline:
                raise TimeoutError(f"upstream task {task_uuid} not {what} within {timeout:.0f} s "
                                   f"(last answer: {answer})")
            time.sleep(POLL)

    # -- tasks --------------------------------------------------------------------------------
    def submit_add(self, x: int, y: int) -> tuple[str, str]:
        return self._submit("add", x=x, y=y)

    def submit_stamp(self) -> tuple[str, str]:
        return self._submit("stamp")

    def submit_checkpointing(self) -> tuple[str, str]:
        return self._submit("checkpointing")

    def submit_progress(self, iterations: int, report: bool) -> tuple[str, str]:
        return self._submit("progress", iterations=iterations, report=report)

    def result(self, handle: tuple[str, str], timeout: float = STALL_TIMEOUT) -> Any:
        def done(answer: dict, seen_running: bool) -> bool:
            if "result" in answer:
                return True
            if seen_running and answer["msg"].startswith("No process linked"):
                raise RuntimeError(f"upstream task {handle[0]} ended without a result (see server.log)")
            return False

        return self._poll(handle, done, timeout, "finished")["result"]

    # -- stop ---------------------------------------------------------------------------------
    def wait_running(self, handle: tuple[str, str], timeout: float = base.WAIT_TIMEOUT) -> None:
        self._poll(handle, lambda answer, seen_running: seen_running, timeout, "running")

    def stop(self, handle: tuple[str, str]) -> None:
        answer = self._call("DELETE", {"uuid": handle[0]})
        if not answer.get("msg", "").startswith("Stop signal sent"):
            raise RuntimeError(f"DELETE of upstream task {handle[0]} answered {answer}")

    def wait_stopped(self, handle: tuple[str, str], timeout: float = base.WAIT_TIMEOUT) -> None:
        self._poll(handle, lambda answer, _: answer["msg"].startswith("No process linked"), timeout, "stopped")
