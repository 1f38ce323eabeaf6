"""An in-process store: fast, for tests and throwaway use; nothing survives the process."""
from __future__ import annotations

import copy
import heapq
import itertools
import threading
from typing import Any, Iterable, Optional, Sequence

from ..exceptions import QueueFull, TaskAlreadyFinished, TaskNotFound
from ..states import ACTIVE, TERMINAL, TaskStatus
from .. import defaults
from .base import COLUMNS, MUTABLE_FIELDS, Row, TaskStore

_QUEUED = TaskStatus.QUEUED.value
_ACTIVE = frozenset(s.value for s in ACTIVE)
_TERMINAL = frozenset(s.value for s in TERMINAL)


class MemoryStore(TaskStore):
    """Tasks in a dict, guarded by one lock; queues as heaps with lazy deletion."""

    shared = False

    def __init__(self) -> None:
        # Guards every attribute below.
        self._lock = threading.Lock()
        self._rows: dict[str, Row] = {}
        self._queues: dict[str, list[tuple[int, int, str]]] = {}
        self._seq = itertools.count(1)
        self._heartbeats: dict[str, float] = {}

    @staticmethod
    def _copy(row: Row) -> Row:
        return copy.deepcopy(row)

    def _queued_count(self, controller: str) -> int:
        return sum(1 for r in self._rows.values() if r["controller"] == controller and r["status"] == _QUEUED)

    def enqueue(self, rows: Sequence[Row], max_queued: int) -> None:
        if not rows:
            return
        with self._lock:
            controller = rows[0]["controller"]
            if max_queued >= 0 and self._queued_count(controller) + len(rows) > max_queued:
                raise QueueFull(max_queued, defaults.RETRY_AFTER)
            for given in rows:
                row = {**dict.fromkeys(COLUMNS), **copy.deepcopy(given)}
                row["seq"] = given["seq"] = next(self._seq)
                self._rows[row["uuid"]] = row
                heapq.heappush(self._queues.setdefault(controller, []), (row["priority"], row["seq"], row["uuid"]))

    def claim(self, controller: str, owner: str, max_running: int, now: float) -> Optional[Row]:
        with self._lock:
            running = sum(1 for r in self._rows.values() if r["controller"] == controller and r["status"] in _ACTIVE)
            if running >= max_running:
                return None
            queue = self._queues.get(controller, [])
            while queue:
                _, _, uuid = heapq.heappop(queue)
                row = self._rows.get(uuid)
                if row is not None and row["status"] == _QUEUED:
                    row.update(status=TaskStatus.RUNNING.value, owner=owner, started_at=now,
                               attempt=row["attempt"] + 1)
                    return self._copy(row)
            return None

    def get(self, uuid: str) -> Optional[Row]:
        with self._lock:
            row = self._rows.get(uuid)
            return None if row is None else self._copy(row)

    def list_tasks(self, controller: str, statuses: Optional[Iterable[str]] = None, limit: int = 100) -> list[Row]:
        wanted = set(statuses) if statuses else None
        with self._lock:
            rows = [r for r in self._rows.values()
                    if r["controller"] == controller and (wanted is None or r["status"] in wanted)]
            rows.sort(key=lambda r: r["seq"], reverse=True)
            return [self._copy(r) for r in rows[:limit]]

    def counts(self, controller: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            for r in self._rows.values():
                if r["controller"] == controller:
                    counts[r["status"]] = counts.get(r["status"], 0) + 1
        return counts

    def position(self, row: Row) -> Optional[int]:
        if row["status"] != _QUEUED:
            return None
        key = (row["priority"], row["seq"])
        with self._lock:
            ahead = sum(1 for r in self._rows.values()
                        if r["controller"] == row["controller"] and r["status"] == _QUEUED
                        and (r["priority"], r["seq"]) < key)
        return ahead + 1

    def _owned_active(self, uuid: str, owner: Optional[str]) -> Optional[Row]:
        row = self._rows.get(uuid)
        if row is None or row["status"] not in _ACTIVE or (owner is not None and row["owner"] != owner):
            return None
        return row

    def update(self, uuid: str, owner: Optional[str] = None, **fields: Any) -> bool:
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown:
            raise ValueError(f"not mutable: {sorted(unknown)}")
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return False
            row.update(copy.deepcopy(fields))
            return True

    def finish(self, uuid: str, status: str, owner: Optional[str] = None, **fields: Any) -> bool:
        unknown = set(fields) - MUTABLE_FIELDS
        if unknown or status not in _TERMINAL:
            raise ValueError(f"bad finish: {status} {sorted(unknown)}")
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return False
            row.update(copy.deepcopy(fields))
            row["status"] = status
            return True

    def requeue(self, uuid: str, owner: Optional[str] = None) -> bool:
        with self._lock:
            row = self._owned_active(uuid, owner)
            if row is None:
                return False
            row.update(status=_QUEUED, owner=None, pid=None, pid_created=None, started_at=None,
                       stop_requested=False)
            heapq.heappush(self._queues.setdefault(row["controller"], []), (row["priority"], row["seq"], uuid))
            return True

    def request_stop(self, uuid: str, now: float) -> Row:
        with self._lock:
            row = self._rows.get(uuid)
            if row is None:
                raise TaskNotFound(uuid)
            if row["status"] in _TERMINAL:
                raise TaskAlreadyFinished(uuid, row["status"])
            if row["status"] == _QUEUED:
                row.update(status=TaskStatus.STOPPED.value, ended_at=now, stop_requested=True)
            elif row["status"] == TaskStatus.RUNNING.value:
                row.update(status=TaskStatus.STOPPING.value, stop_requested=True)
            return self._copy(row)

    def stop_requests(self, uuids: Iterable[str]) -> set[str]:
        with self._lock:
            return {u for u in uuids if u in self._rows and self._rows[u]["stop_requested"]}

    def active(self, controller: str) -> list[Row]:
        with self._lock:
            return [self._copy(r) for r in self._rows.values()
                    if r["controller"] == controller and r["status"] in _ACTIVE]

    def purge(self, controller: str, ended_before: float) -> int:
        with self._lock:
            doomed = [u for u, r in self._rows.items()
                      if r["controller"] == controller and r["status"] in _TERMINAL
                      and r["ended_at"] is not None and r["ended_at"] < ended_before]
            for u in doomed:
                del self._rows[u]
            return len(doomed)

    def heartbeat(self, owner: str, now: float) -> None:
        with self._lock:
            self._heartbeats[owner] = now

    def heartbeats(self) -> dict[str, float]:
        with self._lock:
            return dict(self._heartbeats)

    def forget_owner(self, owner: str) -> None:
        with self._lock:
            self._heartbeats.pop(owner, None)
