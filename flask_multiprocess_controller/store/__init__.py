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

__all__ = ["TaskStore", "MemoryStore", "SQLiteStore", "resolve_store", "sqlite_path_from_url"]


def sqlite_path_from_url(url: str) -> str:
    """Return the file path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL (options dropped)."""
    if not url.startswith("sqlite:///"):
        raise StoreError(f"A SQLite store URL looks like sqlite:///relative.db or sqlite:////abs.db, not {url!r}.")
    path = url[len("sqlite:///"):].partition("?")[0]
    if not path:
        raise StoreError("The SQLite store URL names no file: use sqlite:///mpc-tasks.sqlite3.")
    return path


def _sqlite_store(url: str) -> SQLiteStore:
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
    return SQLiteStore(sqlite_path_from_url(url), mode=mode)


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
        return _sqlite_store(url)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(url)
    raise StoreError(f"Unsupported store URL {url!r}: use sqlite:///path.db, redis://host:port/db or memory://.")
