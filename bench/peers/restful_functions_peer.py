"""restful-functions 2.x: a process forked per call behind an aiohttp server, driven over HTTP.

The server (:mod:`bench.peers.restful_functions_app`) registers each task with
``max_concurrency=2``, its own per-function limit. How the interface maps onto its API:

- submit: ``POST /{function}`` with the arguments as JSON; the answer is ``{"success", "message",
  "task_id"}``. restful-functions has no queue: a call over the limit is refused ("Over Max
  Concurrency 2"), so :meth:`submit_add` and the others retry every :data:`POLL` seconds until the
  call is taken (refusals counted in :attr:`RestfulFunctionsPeer.refused`). The handle is
  ``(function, task_id)``.
- result: :meth:`result` polls ``GET /task/info/{task_id}`` every :data:`POLL` seconds until its
  ``status`` leaves ``RUNNING``; ``DONE`` gives ``result``, ``FAILED`` raises. (The README's
  blocking call, ``POST /{function}/keep-connection``, polls the store once a second by default,
  and cannot be combined with a handle returned at once.)
- stop: ``POST /terminate/function/{function}``, which SIGTERMs and joins that function's
  processes and marks their tasks ``FAILED`` ("Manual Termination"). The per-task endpoint,
  ``POST /terminate/task/{task_id}``, fails in 2.0.1 with HTTP 500 (its handler takes an argument
  aiohttp does not pass). The stop workloads run one task at a time, so stopping the function
  stops exactly that task. A task cannot check for a stop, so checkpointing and ignoring tasks
  are stopped the same way (SIGTERM). Stopped = ``status`` is ``FAILED``.
- running: a task's process is forked by the POST that starts it; ``wait_running`` waits until
  ``/task/info`` shows it ``RUNNING``.

No progress call exists, so the progress workload is not taken part in.

Its default task store is SQLite, and every read of a task (``/task/info``, ``/task/done``,
``/task/result``) first deletes expired rows and commits, on the server's one event-loop thread:
each poll is a write (an fsync), which competes with the submits and the tasks' own writes, so
these figures depend on the disk more than other peers' do.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import requests

from . import base
from .base import Peer, PeerUnavailable

#: Seconds between two polls (and two refused submits) of one client.
POLL = 0.002
#: Seconds one HTTP request may take.
HTTP_TIMEOUT = 10.0


class RestfulFunctionsPeer(Peer):
    """restful-functions' ``FunctionServer`` with ``max_concurrency=2`` per function."""

    key = "restful-functions"
    label = "restful-functions (aiohttp, fork per call)"
    supports = frozenset({base.BURST, base.SEQUENTIAL, base.DISPATCH, base.STOP_CHECKPOINT, base.STOP_IGNORING})

    def __init__(self, workdir: Path, python: Optional[str] = None) -> None:
        super().__init__(workdir, python)
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""
        self._local = threading.local()
        #: Submits refused for being over the function's concurrency limit (then retried).
        self.refused = 0

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        try:
            import restful_functions  # noqa: F401  (the server imports it; fail here with a reason)
        except ImportError as exc:
            raise PeerUnavailable(f"restful-functions is not installed: {exc}") from None
        port = base.free_port()
        log = self.workdir / "server.log"
        self.proc = base.spawn([self.python, "-u", "-m", "bench.peers.restful_functions_app", "--port", str(port),
                                "--db", str(self.workdir / "tasks.db")], log)
        base.wait_port(port, self.proc, log=log)
        self.url = f"http://127.0.0.1:{port}"
        self.result(self.submit_add(1, 1))  # warm-up

    def close(self) -> None:
        base.stop_tree(self.proc)
        self.proc = None

    def versions(self) -> dict:
        from importlib.metadata import version

        return {"restful-functions": version("restful-functions"), "aiohttp": version("aiohttp")}

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    # -- HTTP ---------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        """One request; the JSON answer (HTTP errors raise)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            answer = session.request(method, self.url + path, json=body, timeout=HTTP_TIMEOUT)
        except requests.Timeout:
            raise TimeoutError(f"{method} {path} got no answer within {HTTP_TIMEOUT:.0f} s") from None
        answer.raise_for_status()
        return answer.json()

    def _submit(self, function: str, timeout: float = base.WAIT_TIMEOUT, **kwargs: Any) -> tuple[str, str]:
        """Call ``function``, retrying while it is at its concurrency limit."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self._call("POST", f"/{function}", kwargs)
            if answer["success"]:
                return function, answer["task_id"]
            if not answer["message"].startswith("Over Max Concurrency"):
                raise RuntimeError(f"POST /{function} refused: {answer}")
            self.refused += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"POST /{function} still over its concurrency limit after {timeout:.0f} s")
            time.sleep(POLL)

    def _info(self, handle: tuple[str, str], done, timeout: float, what: str) -> dict:
        """Poll ``/task/info`` every :data:`POLL` s until ``done(info)`` is true."""
        return base.poll_until(lambda: self._call("GET", f"/task/info/{handle[1]}"), done, timeout,
                               f"restful-functions task {handle[1]} {what}", POLL)

    # -- tasks --------------------------------------------------------------------------------
    def submit_add(self, x: int, y: int) -> tuple[str, str]:
        return self._submit("add", x=x, y=y)

    def submit_stamp(self) -> tuple[str, str]:
        return self._submit("stamp")

    def submit_checkpointing(self) -> tuple[str, str]:
        return self._submit("checkpointing")

    def submit_ignoring(self) -> tuple[str, str]:
        return self._submit("ignoring")

    def result(self, handle: tuple[str, str], timeout: float = base.WAIT_TIMEOUT) -> Any:
        info = self._info(handle, lambda i: i["status"] != "RUNNING", timeout, "finished")
        if info["status"] != "DONE":
            raise RuntimeError(f"restful-functions task {handle[1]} ended {info['status']}: {info['result']}")
        return info["result"]

    # -- stop ---------------------------------------------------------------------------------
    def wait_running(self, handle: tuple[str, str], timeout: float = base.WAIT_TIMEOUT) -> None:
        self._info(handle, lambda i: i["status"] == "RUNNING", timeout, "running")

    def stop(self, handle: tuple[str, str]) -> None:
        self._call("POST", f"/terminate/function/{handle[0]}")

    def wait_stopped(self, handle: tuple[str, str], timeout: float = base.WAIT_TIMEOUT) -> None:
        self._info(handle, lambda i: i["status"] == "FAILED", timeout, "stopped")
