"""Task stores and the URL that chooses one."""
from __future__ import annotations

import importlib
import os
import re
from typing import Optional, Union
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .. import defaults
from ..exceptions import StoreError
from .base import TaskStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["TaskStore", "MemoryStore", "SQLiteStore", "resolve_store", "sqlite_path_from_url", "store_url",
           "redacted_url"]

#: The schemes of the PostgreSQL store (SQLAlchemy's spellings included).
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2", "postgres+psycopg")


def redacted_url(url: str) -> str:
    """``url`` without its password (``user:***@host``): how logs, errors, health and pages show a store URL."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url.partition("://")[0] + "://***"
    if password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


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


#: ``module.path:ClassName``, then optionally ``?options`` or ``+url``: a store class by its import path.
_CLASS_URL = re.compile(
    r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    r"(?:(?P<sep>[?+])(?P<rest>.*))?", re.DOTALL)


def _store_class(module_name: str, name: str, url: str) -> type[TaskStore]:
    """The TaskStore subclass at ``module_name:name``, else a StoreError saying what is wrong."""
    try:
        found: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise StoreError(f"The store URL {url!r} names module {module_name!r}, which cannot be imported: {exc}") \
            from exc
    for part in name.split("."):
        if not hasattr(found, part):
            raise StoreError(f"The store URL {url!r} names {name!r}, which module {module_name!r} does not have.")
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, TaskStore)):
        raise StoreError(f"The store URL {url!r} names {found!r}, which is not a subclass of "
                         f"flask_multiprocess_controller.store.TaskStore.")
    return found


def _class_store(found: re.Match[str], url: str) -> TaskStore:
    """Build the store a ``module.path:ClassName`` URL names (see :func:`resolve_store`)."""
    cls = _store_class(found["module"], found["name"], url)
    args: list[str] = []
    options: dict[str, str] = {}
    if found["sep"] == "+":
        args.append(found["rest"])
    elif found["sep"] == "?":
        pairs = parse_qsl(found["rest"], keep_blank_values=True)
        options = dict(pairs)
        if len(options) != len(pairs):
            raise StoreError(f"The store URL {url!r} gives an option twice.")
    try:
        return cls(*args, **options)
    except TypeError as exc:
        raise StoreError(f"The store URL {url!r} could not build {cls.__qualname__}: {exc}") from exc


def store_url(store: Optional[str] = None) -> str:
    """The URL of the store named by ``store``, else by ``MPC_STORE_URL``, else of the default SQLite file."""
    return store or os.environ.get(defaults.STORE_URL_ENV) or f"sqlite:///{defaults.DEFAULT_SQLITE_PATH}"


def resolve_store(store: Union[None, str, TaskStore], base_dir: Optional[str] = None) -> TaskStore:
    """Return the store named by ``store``, else by ``MPC_STORE_URL``, else the default SQLite file.

    The URLs:

    - ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (``?mode=0640``: the
      permissions of a file it creates): :class:`SQLiteStore`;
    - ``redis://host:port/db`` (also ``rediss://``, ``unix://``): :class:`~.redis.RedisStore`;
    - ``postgresql://user:password@host:port/database`` (also ``postgresql+psycopg://``):
      :class:`~.postgres.PostgresStore`, its tables in the schema ``MPC_PG_SCHEMA`` (default ``mpc``);
    - ``memory://``: :class:`MemoryStore`;
    - ``module.path:ClassName``: a store class of your own, imported from its module (a subclass
      of :class:`TaskStore`, else :class:`~..exceptions.StoreError`) and called without
      arguments. After the class name, either ``?key=value&...`` calls it with those keyword
      arguments (strings), or ``+`` and a URL calls it with that URL as its one argument, taken
      verbatim to the end (its own ``?`` included): ``mypkg.stores:PostgresStore+postgresql://db/tasks``.
      The schemes above come first: a top-level module named ``memory``, ``sqlite``, ``redis``,
      ``rediss`` or ``unix`` is reached through a package path instead.

    :param base_dir: the folder relative SQLite paths are relative to (an app's instance
        folder); the working directory when None.
    :raises StoreError: for a URL of none of these forms, or a store class that cannot be
        imported or built from it.

    .. versionchanged:: 0.3
        Store classes by their import path.
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
    if scheme in POSTGRES_SCHEMES:
        from .postgres import PostgresStore

        return PostgresStore(url)
    found = _CLASS_URL.fullmatch(url)
    if found is not None:
        return _class_store(found, url)
    raise StoreError(f"Unsupported store URL {url!r}: use sqlite:///path.db, redis://host:port/db, "
                     f"postgresql://user@host/db, memory:// "
                     f"or module.path:StoreClass.")
