"""Make the dashboard page's pictures: ``docs/dashboard.png`` (1280 px) and ``docs/dashboard-phone.png``.

Starts ``examples/app.py`` on a free port of 127.0.0.1 with a throwaway SQLite store, gives it
tasks in every usual state (succeeded, failed, stopped, timed out, running with progress, queued),
and photographs ``/mpc/`` with Debian's ``chromium`` driven by Playwright::

    python docs/screenshots.py
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
SERVE = """
import os, runpy
app = runpy.run_path({example!r}, run_name="example")["app"]
app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the example app exited before it served")
        try:
            requests.get(base + "/mpc/health", timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit("the example app did not start within 30 s")


def _post(base: str, query: str = "", **kwargs: object) -> str:
    answer = requests.post(f"{base}/primes{query}", json=kwargs, timeout=30)
    answer.raise_for_status()
    return str(answer.json()["uuid"])


def _tasks(base: str) -> None:
    """Tasks in every usual state; two keep running with progress while the pictures are taken."""
    for limit in (20_000, 50_000, 80_000):
        _post(base, "?wait=20", limit=limit)
    _post(base, "?wait=20", limit=1000, chunks=0)  # ZeroDivisionError: failed
    _post(base, "?timeout=1&wait=20", limit=100_000, pause=0.5)  # timed_out
    stopped = _post(base, limit=100_000, pause=0.5)
    time.sleep(1)
    requests.delete(f"{base}/mpc/api/tasks/{stopped}", timeout=10)
    for _ in range(2):
        _post(base, limit=400_000, chunks=100, pause=0.3)  # running
    for _ in range(2):
        _post(base, limit=400_000, pause=0.3)  # queued behind them
    time.sleep(4)  # let the running ones report some progress


def _photograph(base: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            for name, viewport in (("dashboard.png", {"width": 1280, "height": 800}),
                                   ("dashboard-phone.png", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport, device_scale_factor=1)
                page.goto(base + "/mpc/")
                page.wait_for_selector("#connection.up")
                page.wait_for_selector("#task-rows tr[data-status='running']")
                page.wait_for_timeout(500)
                (ROOT / "docs" / name).write_bytes(page.screenshot())
                page.close()
        finally:
            browser.close()


def main() -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "serve.py"
        script.write_text(SERVE.format(example=str(ROOT / "examples" / "app.py")))
        env = {**os.environ, "PORT": str(port), "MPC_STORE_URL": f"sqlite:///{tmp}/tasks.sqlite3",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        server = subprocess.Popen([sys.executable, str(script)], cwd=tmp, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(base, server)
            _tasks(base)
            _photograph(base)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    print("wrote docs/dashboard.png and docs/dashboard-phone.png")


if __name__ == "__main__":
    main()
