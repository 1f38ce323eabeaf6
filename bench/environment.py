"""The benchmark's own environment: Debian's ``redis-server``, and a venv at ``bench/.venv`` with
the peers' packages (``bench/requirements.txt``) and this project installed editable.

The upstream 0.1.1 release pins Flask 1.1, so it gets a venv of its own (``bench/.venv-upstream``,
made by its peer). Both venvs are made once and reused while the requirements are unchanged.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
VENV = BENCH_DIR / ".venv"
REQUIREMENTS = BENCH_DIR / "requirements.txt"
MARKER = VENV / ".requirements.sha256"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def in_venv() -> bool:
    """True when this interpreter is the benchmark venv's."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def _requirements_digest() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes())
    digest.update((REPO_DIR / "pyproject.toml").read_bytes())
    return digest.hexdigest()


def ensure_redis_server() -> None:
    """Install Debian's redis-server when it is missing (Celery's and RQ's broker)."""
    if shutil.which("redis-server"):
        return
    if os.geteuid() != 0:
        sys.exit("redis-server is missing: install Debian's redis-server package (apt-get install redis-server).")
    print("Installing redis-server (Debian package) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True, env=env, stdout=subprocess.DEVNULL)


def ensure_venv() -> Path:
    """Create or refresh ``bench/.venv``; return its python."""
    digest = _requirements_digest()
    if venv_python().exists() and MARKER.exists() and MARKER.read_text() == digest:
        return venv_python()
    print(f"Preparing the benchmark environment in {VENV} ...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if not venv_python().exists():
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS), "-e", str(REPO_DIR)], check=True)
    MARKER.write_text(digest)
    return venv_python()


def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil
        memory = f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB"
    except ImportError:
        memory = "?"
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "memory": memory,
            "kernel": platform.release(), "python": platform.python_version(), "platform": platform.platform()}
