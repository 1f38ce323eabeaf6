"""Task stores and the URL that chooses one."""
from __future__ import annotations

import os
from typing import Optional, Union
from urllib.parse import urlsplit

from .. import defaults
from ..exceptions import StoreError
from .base import TaskStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["TaskStore", "MemoryStore", "SQLiteStore", "resolve_store", "sqlite_path_from_url"]


def sqlite_path_from_url(url: str) -> str:
    """Return the file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"A SQLite store URL looks like sqlite:///relative.db or sqlite:////abs.db, not {url!r}.")
    path = url[len("sqlite:///"):]
    if not path:
        raise StoreError("The SQLite store URL names no file: use sqlite:///mpc-tasks.sqlite3.")
    return path


def resolve_store(store: Union[None, str, TaskStore]) -> TaskStore:
    """Return the store named by ``store``, else by ``MPC_STORE_URL``, else the default SQLite file."""
    if isinstance(store, TaskStore):
        return store
    url: Optional[str] = store or os.environ.get(defaults.STORE_URL_ENV)
    if not url:
        return SQLiteStore(defaults.DEFAULT_SQLITE_PATH)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        return SQLiteStore(sqlite_path_from_url(url))
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    raise StoreError(f"Unsupported store URL {url!r}: use sqlite:///path.db, redis://host:port/db or memory://.")
