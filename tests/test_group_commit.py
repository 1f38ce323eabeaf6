"""Writes that threads ask for together share one SQLite transaction; each still gets its own answer,
and one that fails undoes only itself."""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest
from test_store_contract import make_row

from flask_multiprocess_controller import SQLiteStore
from flask_multiprocess_controller.exceptions import StoreError
from flask_multiprocess_controller.store.groupcommit import GroupCommit


class Database:
    """A real SQLite file; counts the transactions it commits."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        self.commits = 0

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        self.commits += 1

    def keys(self) -> set[str]:
        return {k for (k,) in self.conn.execute("SELECT k FROM t")}


def _insert(key: str):
    def work(db: sqlite3.Connection) -> str:
        db.execute("INSERT INTO t (k) VALUES (?)", (key,))
        return key
    return work


@pytest.mark.timeout(30)
def test_writes_waiting_together_share_one_commit_and_a_failure_undoes_only_itself(tmp_path):
    database = Database(str(tmp_path / "g.sqlite3"))
    group = GroupCommit(database.transaction, lambda exc: StoreError(str(exc)))
    holding, release = threading.Event(), threading.Event()

    def first(db: sqlite3.Connection) -> str:
        holding.set()
        assert release.wait(10)
        return _insert("first")(db)

    answers: dict[str, object] = {}

    def ask(name: str, work) -> None:
        try:
            answers[name] = group.run(work)
        except BaseException as exc:  # noqa: BLE001 - the answer under test
            answers[name] = exc

    leader = threading.Thread(target=ask, args=("first", first))
    leader.start()
    assert holding.wait(10)  # the leader's transaction is open; these wait behind it
    followers = [threading.Thread(target=ask, args=(f"k{i}", _insert(f"k{i}"))) for i in range(5)]
    followers.append(threading.Thread(target=ask, args=("dup", _insert("k0"))))  # fails: k0 is taken
    for thread in followers:
        thread.start()
    while len(group._waiting) < len(followers):
        threading.Event().wait(0.01)
    release.set()
    for thread in [leader, *followers]:
        thread.join(10)

    assert database.commits == 2, "the leader's write alone, then the six waiting ones together"
    assert {answers[f"k{i}"] for i in range(5)} == {f"k{i}" for i in range(5)} and answers["first"] == "first"
    assert isinstance(answers["dup"], StoreError) and "UNIQUE" in str(answers["dup"])
    assert database.keys() == {"first", *(f"k{i}" for i in range(5))}


@pytest.mark.timeout(30)
def test_a_write_alone_is_one_transaction_and_its_error_reaches_its_caller(tmp_path):
    database = Database(str(tmp_path / "g.sqlite3"))
    group = GroupCommit(database.transaction, lambda exc: StoreError(str(exc)))
    assert group.run(_insert("a")) == "a"
    with pytest.raises(sqlite3.IntegrityError):
        group.run(_insert("a"))
    assert database.commits == 1 and database.keys() == {"a"}


@pytest.mark.timeout(60)
def test_slots_ending_together_each_get_their_own_event(tmp_path):
    """Many threads end tasks of one store at once: every end is written, with its own event."""
    store = SQLiteStore(str(tmp_path / "s.sqlite3"))
    try:
        rows = [make_row("c") for _ in range(16)]
        store.enqueue(rows, -1)
        uuids = [row["uuid"] for row in rows]
        claimed = [store.claim("c", "host:1:1.0", 16) for _ in uuids]
        assert {row["uuid"] for row in claimed} == set(uuids)
        barrier = threading.Barrier(16)
        events: dict[str, object] = {}

        def end(uuid: str) -> None:
            barrier.wait()
            events[uuid] = store.finish(uuid, "succeeded", owner="host:1:1.0", result=1)

        threads = [threading.Thread(target=end, args=(uuid,)) for uuid in uuids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert {uuid: (e["kind"], e["uuid"]) for uuid, e in events.items()} == {u: ("ended", u) for u in uuids}
        assert {store.get(uuid)["status"] for uuid in uuids} == {"succeeded"}
    finally:
        store.close()
