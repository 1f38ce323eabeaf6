"""The application's own transaction, as the PostgreSQL store writes in it (the transactional enqueue).

An application that already talks to PostgreSQL (psycopg 3, psycopg2, SQLAlchemy, Flask-SQLAlchemy) hands
its connection or session over; the store's statements then run on the driver connection underneath, in
the transaction the application has open, inside a savepoint of their own: a refusal (a full queue, a
replayed idempotency key) undoes only what the store wrote, and the application's transaction goes on.
"""
from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..exceptions import StoreError

if TYPE_CHECKING:
    from .postgres import PostgresStore

#: What ``connection=`` takes, as errors say it.
ACCEPTED = ("a psycopg 3 or psycopg2 connection, or a SQLAlchemy Connection or Session (Flask-SQLAlchemy's "
            "db.session) on the store's PostgreSQL database")


def driver_connection(connection: Any) -> Any:
    """The DB-API connection of what the application handed over (a session's joins its transaction).

    :raises StoreError: it is none of :data:`ACCEPTED`.
    """
    module = type(connection).__module__
    if module.startswith("sqlalchemy"):
        if hasattr(connection, "get_bind"):  # a Session or a scoped_session: its transaction's Connection
            connection = connection.connection()
        elif hasattr(connection, "in_transaction") and not connection.in_transaction():
            connection.begin()  # what its next statement would do: the application's commit() then commits ours
        proxied = getattr(connection, "connection", None)
        raw = getattr(proxied, "driver_connection", None) or getattr(proxied, "connection", None)
        if raw is None:
            raise StoreError(f"connection= got a SQLAlchemy {type(connection).__name__} without a database "
                             f"connection; it takes {ACCEPTED}.")
        connection = raw
        module = type(connection).__module__
    if module.split(".")[0] in ("psycopg", "psycopg2", "psycopg_binary"):
        return connection
    raise StoreError(f"connection= got {type(connection).__name__!s}; it takes {ACCEPTED}.")


class AppTransaction:
    """The store's part of the application's transaction: a savepoint in it (or a transaction of its own when
    the connection is in autocommit mode), with the interface of the store's own transactions."""

    def __init__(self, connection: Any, store: "PostgresStore") -> None:
        from .postgres import _Tx

        self._raw = driver_connection(connection)
        self._store = store
        self._own = bool(getattr(self._raw, "autocommit", False))
        self._tx = _Tx(self)
        self.events = self._tx.events

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self._raw.cursor()
        cursor.execute(sql, tuple(params))
        return cursor

    @property
    def now(self) -> float:
        return self._tx.now

    def emit(self, *args: Any) -> Any:
        return self._tx.emit(*args)

    def __enter__(self) -> "AppTransaction":
        s = self._store.schema
        self.execute("BEGIN" if self._own else "SAVEPOINT mpc_enqueue")
        try:
            (table,) = self.execute("SELECT to_regclass(%s)::text", (f"{s}.meta",)).fetchone()
            found = None if table is None else self.execute(
                f"SELECT value FROM {s}.meta WHERE key = 'store_id'").fetchone()
            if found is None or int(found[0]) != self._store.store_id:
                raise StoreError(f"connection= is not connected to the database of the store at "
                                 f"{self._store.public_url} (schema {s}): the tasks would not be seen there.")
        except BaseException:
            self._undo()
            raise
        return self

    def _undo(self) -> None:
        self.execute("ROLLBACK" if self._own else "ROLLBACK TO SAVEPOINT mpc_enqueue")
        if not self._own:
            self.execute("RELEASE SAVEPOINT mpc_enqueue")

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException],
                 trace: Optional[TracebackType]) -> None:
        if error is None:
            self.execute("COMMIT" if self._own else "RELEASE SAVEPOINT mpc_enqueue")
        else:
            try:
                self._undo()
            except Exception:  # the connection itself failed: the application's transaction is lost anyway
                pass
