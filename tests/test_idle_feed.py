"""An idle reader of the change feed sleeps: SQLite's file watch wakes it on a change of the database's
files only, and ``interrupt_waits()`` ends a long wait of any store."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from flask_multiprocess_controller.events import Changes
from flask_multiprocess_controller.store import MemoryStore, SQLiteStore
from flask_multiprocess_controller.store import filewatch

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


@linux_only
def test_the_file_watch_wakes_on_the_database_files_only(tmp_path) -> None:
    db = tmp_path / "tasks.sqlite3"
    watch = filewatch.watch(str(db))
    assert watch is not None
    try:
        seen = watch.generation
        (tmp_path / "unrelated.log").write_text("noise")
        assert watch.wait(seen, 0.2, time.monotonic) == seen  # another file of the directory: still asleep
        writer = threading.Timer(0.05, lambda: (tmp_path / "tasks.sqlite3-wal").write_bytes(b"frame"))
        writer.start()
        try:
            assert watch.wait(seen, 30.0, time.monotonic) != seen  # a commit writes the -wal file
        finally:
            writer.join()
        seen = watch.generation
        watch.wake()
        assert watch.wait(seen, 30.0, time.monotonic) != seen
    finally:
        watch.close()
    assert watch.broken


@linux_only
@pytest.mark.timeout(60)
def test_making_a_file_watch_starts_no_process(tmp_path) -> None:
    """The watch is made by the first waiting thread, under the lock every commit of the process takes: finding
    the C library there once ran ``ldconfig`` in a subprocess, and the process's writes stalled behind it."""
    script = (
        "import subprocess, sys\n"
        "def refuse(*args, **kwargs):\n"
        "    raise AssertionError('a subprocess was started: %r' % (args,))\n"
        "subprocess.Popen = refuse\n"
        "from flask_multiprocess_controller.store import filewatch\n"
        f"watch = filewatch.watch({str(tmp_path / 'tasks.sqlite3')!r})\n"
        "assert watch is not None, 'no inotify watch'\n"
        "watch.close()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr


@linux_only
@pytest.mark.parametrize("without_progress", [False, True], ids=["reader", "follower"])
def test_a_waiting_sqlite_reader_wakes_on_another_store_objects_commit(tmp_path, monkeypatch,
                                                                       without_progress) -> None:
    # Two store objects on one file share no condition: only the file's change can wake the reader
    # (besides its safety look), as for a reader in another process.
    monkeypatch.delenv("MPC_SQLITE_FILE_WATCH", raising=False)  # on by default
    path = str(tmp_path / "tasks.sqlite3")
    reader, writer = SQLiteStore(path), SQLiteStore(path)
    try:
        cursor = reader.latest_cursor()
        row = {"uuid": "u-1", "controller": "ctl", "status": "queued", "priority": 0, "args": {},
               "created_at": time.time(), "attempt": 0, "stop_requested": False}
        later = threading.Timer(0.1, lambda: writer.enqueue([dict(row)], -1))
        later.start()
        try:
            changes = reader.changes(cursor, 30.0, foreign_only=True, without_progress=without_progress)
        finally:
            later.join()
        assert [e["uuid"] for e in changes.events] == ["u-1"]
        found = reader._watches.get(without_progress)  # a follower sleeps on the signal file's watch
        assert found is not None and not found.broken  # it slept on the watch, not polling
    finally:
        reader.close()
        writer.close()


@linux_only
@pytest.mark.timeout(60)
def test_only_commits_that_made_events_a_follower_acts_on_write_the_feed_signal(tmp_path) -> None:
    """A heartbeat or a batch of progress commits to the database but leaves the signal file alone, so that the
    followers of other processes sleep on; a stop request writes it."""
    from flask_multiprocess_controller.store import filewatch
    from flask_multiprocess_controller.store.feedsignal import SUFFIX

    path = str(tmp_path / "tasks.sqlite3")
    writer = SQLiteStore(path)
    assert writer._signal.ensure()
    watch = filewatch.watch_file(path + SUFFIX)
    assert watch is not None
    try:
        row = {"uuid": "u-1", "controller": "ctl", "status": "queued", "priority": 0, "args": {},
               "created_at": time.time(), "attempt": 0, "stop_requested": False}
        writer.enqueue([row], -1)
        owner = "host-a:1:1.0"
        assert writer.claim("ctl", owner, 10) is not None
        seen = watch.wait(watch.generation, 10.0, time.monotonic)  # the claim's signal, if not read yet
        seen = watch.wait(seen, 0.2, time.monotonic)
        writer.heartbeat(owner)
        assert writer.progress("u-1", owner, 1, None) is not None
        assert writer.heartbeat_and_drained(owner) == {}
        assert watch.wait(seen, 0.5, time.monotonic) == seen, "a commit without such an event wrote the signal"
        writer.request_stop("u-1")
        assert watch.wait(seen, 10.0, time.monotonic) != seen, "the stop request wrote no signal"
    finally:
        watch.close()
        writer.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_interrupt_waits_ends_a_long_wait(tmp_path, request, kind: str) -> None:
    if kind == "redis":
        from flask_multiprocess_controller.store.redis import RedisStore

        store = RedisStore(request.getfixturevalue("redis_url"))
    else:
        store = MemoryStore() if kind == "memory" else SQLiteStore(str(tmp_path / "tasks.sqlite3"))
    found: list[Changes] = []
    cursor = store.latest_cursor()
    reader = threading.Thread(target=lambda: found.append(store.changes(cursor, 60.0, foreign_only=True)))
    reader.start()
    try:
        while reader.is_alive():  # interrupted again, in case it was not waiting yet
            store.interrupt_waits()
            reader.join(0.05)
        assert found == [Changes([], cursor, False)]
    finally:
        reader.join()
        store.close()
