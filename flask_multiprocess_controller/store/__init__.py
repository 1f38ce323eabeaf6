"""Task stores and the URL that chooses one."""
from __future__ import annotations

import os
import re
from typing import Optional, Union
from urllib.parse import parse_qsl, urlsplit

from .. import defaults
from ..exceptions import StoreError
from .base import TaskStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["TaskStore", "MemoryStore", "SQLiteStore", "resolve_store", "sqlite_path_from_url", "store_url"]


def sqlite_path_from_url(url: str) -> str:
    """Return the file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL (options dropped)."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"A SQLite store URL looks like sqlite:///relative.db or sqlite:////abs.db, not {url!r}.")
    path = url[len("sqlite:///"):].partition("?")[0]
    if not path:
        raise StoreError("The SQLite store URL names no file: use sqlite:///mpc-tasks.sqlite3.")
    return path


def _sqlite_store(url: str, base_dir: Optional[str] = None) -> SQLiteStore:
    """The store of a SQLite URL; ``?mode=0640`` (octal) sets the permissions of a file it creates."""
    options = dict(parse_qsl(url.partition("?")[2], keep_blank_values=True))
    unknown = set(options) - {"mode"}
    if unknown:
        raise StoreError(f"Unknown SQLite store option(s) {sorted(unknown)} in {url!r}: only mode= is known.")
    mode = 0o600
    if "mode" in options:
        if not re.fullmatch(r"[0-7]{3,4}", options["mode"]) or int(options["mode"], 8) > 0o777:
            raise StoreError(f"The SQLite store's mode= is octal permissions like 0600 or 0640, "
                             f"not {options['mode']!r}.")
        mode = int(options["mode"], 8)
    path = sqlite_path_from_url(url)
    if base_dir is not None and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return SQLiteStore(path, mode=mode)


def store_url(store: Optional[str] = None) -> str:
    """The URL of the store named by ``store``, else by ``MPC_STORE_URL``, else of the default SQLite file."""
    return store or os.environ.get(defaults.STORE_URL_ENV) or f"sqlite:///{defaults.DEFAULT_SQLITE_PATH}"


def resolve_store(store: Union[None, str, TaskStore], base_dir: Optional[str] = None) -> TaskStore:
    """Return the store named by ``store``, else by ``MPC_STORE_URL``, else the default SQLite file.

    :param base_dir: the folder relative SQLite paths are relative to (an app's instance
        folder); the working directory when None.
    """
    if isinstance(store, TaskStore):
        return store
    url = store_url(store)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        return _sqlite_store(url, base_dir)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    raise StoreError(f"Unsupported store URL {url!r}: use sqlite:///path.db, redis://host:port/db or memory://.")
