"""The progress of one runtime's running tasks, written to the store together, once per flush interval.

Each controlling thread used to write its task's progress itself, one store write (and one event) per
task every quarter second: with many busy tasks, most of what a serving process spent. Now a controlling
thread only marks its run (:meth:`ProgressFlusher.mark`: a dictionary store, at each progress message);
one flusher thread per runtime takes every run marked since its last write and writes the latest
progress, percent and usage of each with one :meth:`~..store.TaskStore.progress_many` call (one
transaction, or one Redis script) at most every ``interval`` seconds (``MPC_PROGRESS_FLUSH``). Values a
task reported between two writes are coalesced: the latest wins, as it did before.

Ordering: before a controlling thread records its task's end (or lets it go for adoption) it calls
:meth:`ProgressFlusher.forget`, which drops what is still pending for the run and waits out a batch that is
writing it, events published; the end record carries the final progress itself. So an end is never
followed by an older progress, in the store or in the events a process dispatches. The flusher thread
starts with the first mark and sleeps (no timeout) while nothing is pending: it costs nothing when idle.

Tasks whose process writes its progress to a shared buffer (see :mod:`.progressbuffer`) are *watched*: the
flusher reads their buffers once per interval, marking the runs whose value changed, so that their values
wake no controlling thread. It sleeps without a timeout again once no watched task is left.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from ..events import Event
from ..exceptions import StoreError
from ..store import TaskStore
from ..store.base import ProgressWrite
from .progressbuffer import BufferReader

if TYPE_CHECKING:
    from .supervisor import TaskRun


#: Seconds between two reads of the watched buffers at least (an interval of 0 writes marks at once).
_MIN_POLL = 0.05


class ProgressFlusher:
    """Writes the latest progress of the runs marked since the last write, all at once, every ``interval`` s.

    :param owner: the serving process's owner id (the writes are fenced by it).
    :param interval: seconds between two writes at least (0: as soon as the flusher thread gets to it).
    :param publish: called with each event the writes produce, in the flusher thread.
    """

    def __init__(self, store: TaskStore, owner: str, interval: float, publish: Callable[[Event], None],
                 logger: logging.Logger, name: str = "mpc-progress") -> None:
        self.store = store
        self.owner = owner
        self.interval = interval
        self._publish = publish
        self._logger = logger
        self._name = name
        # Guards _pending, _in_flight, _thread and _closed.
        self._lock = threading.Lock()
        self._pending: dict[str, TaskRun] = {}
        #: The runs whose progress is read from their process's buffer, with its reader.
        self._watched: dict[str, tuple[TaskRun, BufferReader]] = {}
        self._in_flight: frozenset[str] = frozenset()
        # Held while a batch is written and its events published (forget() waits on it).
        self._writing = threading.Lock()
        self._kick = threading.Event()
        #: Set by close(): ends the wait between two writes at once.
        self._closing = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._next_write = 0.0
        self._failing = False

    def mark(self, run: "TaskRun") -> None:
        """Have the next write carry ``run``'s progress, percent and usage (as they are then)."""
        with self._lock:
            if self._closed:
                return
            self._pending[run.uuid] = run
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._kick.set()

    def watch(self, run: "TaskRun", reader: BufferReader) -> None:
        """Read ``run``'s progress from ``reader`` at each write, until :meth:`forget`."""
        with self._lock:
            if self._closed:
                return
            self._watched[run.uuid] = (run, reader)
        self.mark(run)

    def forget(self, run: "TaskRun") -> None:
        """Write nothing more of ``run``: drop what is pending for it, stop reading its buffer, and wait until a
        batch reading or writing it now is written and its events published (what the controlling thread does
        before recording the end)."""
        with self._lock:
            self._pending.pop(run.uuid, None)
            watched = self._watched.pop(run.uuid, None) is not None
            writing = watched or run.uuid in self._in_flight
        if writing:
            with self._writing:
                pass

    def flush(self) -> None:
        """Write what is pending now, in the calling thread (the flusher thread's step; tests call it)."""
        with self._writing:
            with self._lock:
                watched = list(self._watched.values())
            for run, reader in watched:  # under _writing: forget() waits for this read
                changed, value = reader.read(run.uuid)
                if changed:
                    run.progress = value
                    with self._lock:
                        if run.uuid in self._watched:
                            self._pending[run.uuid] = run
            with self._lock:
                batch, self._pending = self._pending, {}
                self._in_flight = frozenset(batch)
            try:
                if batch:
                    self._write(batch)
            finally:
                with self._lock:
                    self._in_flight = frozenset()

    def _write(self, batch: dict[str, "TaskRun"]) -> None:
        runs = list(batch.values())
        writes = [ProgressWrite(run.uuid, run.progress, run.percent,
                                run.usage.figures() if run.usage is not None else None) for run in runs]
        try:
            events = self.store.progress_many(self.owner, writes)
        except StoreError as exc:  # kept: the next write (or the end record) carries it
            with self._lock:
                for run in runs:
                    if not self._closed:
                        self._pending.setdefault(run.uuid, run)
            if not self._failing:
                self._logger.warning("Cannot write the progress of %d task(s): %s", len(runs), exc)
            self._failing = True
            self._kick.set()  # tried again after the interval
            return
        self._failing = False
        now = time.monotonic()
        for run in runs:
            run.usage_written_at = now
        for event in events:
            if event is not None:
                self._publish(event)

    def _loop(self) -> None:
        while True:
            # Watched buffers are read once per interval; without any, the thread sleeps until a mark.
            self._kick.wait(max(self.interval, _MIN_POLL) if self._watched else None)
            delay = self._next_write - time.monotonic()
            if delay > 0:
                self._closing.wait(delay)  # what arrives meanwhile rides along
            self._kick.clear()
            with self._lock:  # after the clear: a close() that set the kick before it is seen here
                if self._closed:
                    return  # close() writes what is left
            self._next_write = time.monotonic() + self.interval
            try:
                self.flush()
            except Exception:  # a write that fails otherwise must not end the thread: the runs write their end
                self._logger.exception("Writing the progress of running tasks failed.")

    def close(self) -> None:
        """Write what is pending, then end the flusher thread (the runtime's shutdown, once its slots ended)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._closing.set()
        self._kick.set()
        if thread is not None:
            thread.join()
        self.flush()
