"""Group commit: writes that threads of one process ask for at the same moment share one transaction.

When several tasks of a serving process end together (their slots record each end, claim the
next task, write progress), each write would wait for the write lock in turn and commit alone.
Here the first thread to come leads: once it holds the leader's lock it takes every write then
waiting, its own among them, and runs them in one transaction, each in a savepoint so that one
that fails undoes only itself. The others find their answers when they get the lock. A write
that comes alone is one transaction, as it would be without this.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import AbstractContextManager
from typing import Any, Callable, Generic, Optional, TypeVar

T = TypeVar("T")

#: A write: what it does in the transaction it is given.
Work = Callable[[sqlite3.Connection], T]


class _Request(Generic[T]):
    __slots__ = ("work", "result", "error", "done")

    def __init__(self, work: Work[T]) -> None:
        self.work = work
        self.result: Optional[T] = None
        self.error: Optional[BaseException] = None
        self.done = False

    def answer(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class GroupCommit:
    """Runs writes, several at once in one transaction when they come together.

    :param transaction: opens a write transaction and yields its connection (commits on exit).
    :param translate: what a driver error raised by one write of a batch becomes for its caller.
    """

    def __init__(self, transaction: Callable[[], AbstractContextManager[sqlite3.Connection]],
                 translate: Callable[[sqlite3.Error], BaseException]) -> None:
        self._transaction = transaction
        self._translate = translate
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        # Guards _waiting: the writes asked for and not yet taken by a leader.
        self._queue_lock = threading.Lock()
        self._waiting: list[_Request[Any]] = []
        # Held by the leader while its batch runs.
        self._leader = threading.Lock()

    def run(self, work: Work[T]) -> T:
        """Run ``work`` in a write transaction (perhaps shared) and return what it returned."""
        if self._pid != os.getpid():  # forked: locks another thread held at the fork stay held here
            self._reset()
        request: _Request[T] = _Request(work)
        with self._queue_lock:
            self._waiting.append(request)
        with self._leader:
            if not request.done:
                with self._queue_lock:
                    batch, self._waiting = self._waiting, []
                self._commit(batch)
        return request.answer()

    def _commit(self, batch: list[_Request[Any]]) -> None:
        try:
            with self._transaction() as db:
                if len(batch) == 1:
                    batch[0].result = batch[0].work(db)  # an error rolls the transaction back
                else:
                    for request in batch:
                        self._run_in_savepoint(db, request)
        except BaseException as exc:
            for request in batch:  # nothing of the batch was committed
                if request.error is None:
                    request.error, request.result = exc, None
        finally:
            for request in batch:
                request.done = True

    def _run_in_savepoint(self, db: sqlite3.Connection, request: _Request[Any]) -> None:
        db.execute("SAVEPOINT mpc_write")
        try:
            request.result = request.work(db)
        except sqlite3.Error as exc:
            db.execute("ROLLBACK TO mpc_write")
            request.error = self._translate(exc)
        except Exception as exc:  # a refusal (a task not found, say): its caller's to handle
            db.execute("ROLLBACK TO mpc_write")
            request.error = exc
        db.execute("RELEASE mpc_write")
