"""A private PostgreSQL cluster for the benchmarks and the tests: made in a temporary folder, listening on 127.0.0.1
on a free port (the tests pass one of theirs: ``tests/pgserver.py``).

Debian's ``postgresql`` package puts its programs in ``/usr/lib/postgresql/<version>/bin``. The server
refuses to run as root, so when the tests run as root the cluster belongs to the ``postgres`` user and
its programs run through ``runuser``. Password authentication over TCP (``scram-sha-256``) is on, so
that a store URL carries a password as in production.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional, Sequence

import psutil

#: The password of the cluster's superuser, ``postgres``.
PASSWORD = "pg-secret-7f3a"
#: The database the benchmarks and the tests use.
DATABASE = "mpc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_dir() -> Optional[str]:
    """The folder of ``pg_ctl`` (Debian's newest version first), or None when PostgreSQL is not installed."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if versions:
        return os.path.dirname(versions[-1])
    found = shutil.which("pg_ctl")
    return os.path.dirname(found) if found else None


class PostgresCluster:
    """One running cluster; :meth:`url` names its test database, :meth:`restart` and :meth:`stop` control it."""

    def __init__(self, port: int = 0) -> None:
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql).")
        self.bin = binaries
        self.port = port or _free_port()
        self.root = tempfile.mkdtemp(prefix="mpc-pg-")
        self.data = os.path.join(self.root, "data")
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.root, self.user)
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as f:
            f.write(PASSWORD)
        if self.user:
            shutil.chown(pwfile, self.user)
        self._run(["initdb", "-D", self.data, "-U", "postgres", "--pwfile", pwfile, "--auth-local=trust",
                   "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
        self.start()
        self._run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", DATABASE],
                  env={"PGPASSWORD": PASSWORD})

    def _run(self, argv: Sequence[str], env: Optional[dict[str, str]] = None, check: bool = True) -> None:
        command = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
                       env={**os.environ, **(env or {})}, cwd=self.root)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 "
                   "-c shared_buffers=64MB")
        self._run(["pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-o", options, "-w",
                   "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as if it crashed)."""
        self._run(["pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server, wait ``down_for`` seconds, start it again."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def pids(self) -> list[int]:
        """The server's processes (the postmaster and its backends), for CPU accounting."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                root = psutil.Process(int(f.readline()))
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except (OSError, ValueError, psutil.Error):
            return []

    def cpu_seconds(self) -> float:
        """CPU seconds so far of the server's live processes and of those it reaped (exited backends)."""
        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
        return total

    def version(self) -> str:
        done = subprocess.run([os.path.join(self.bin, "postgres"), "--version"], capture_output=True, text=True)
        words = done.stdout.split()  # postgres (PostgreSQL) 15.18 (Debian ...)
        return words[2] if done.returncode == 0 and len(words) > 2 else "?"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
