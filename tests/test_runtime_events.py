"""What a serving process's runtime decides on each task event (``Runtime._on_event``), stepped by hand:
no slot thread, no task process, no sleep; a memory store and a fake monotonic clock.

The decisions: which events wake an idle slot, which stop a run of this process, abandon it or
follow a pause, and when a sibling's shutdown holds off claims.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

import pytest

from flask_multiprocess_controller import defaults
from flask_multiprocess_controller.engine.config import RuntimeConfig
from flask_multiprocess_controller.events import Event
from flask_multiprocess_controller.engine.logs import DefaultMPLoggerConfigurator
from flask_multiprocess_controller.engine.protocol import Limits, error_record
from flask_multiprocess_controller.engine.retrier import Retrier
from flask_multiprocess_controller.engine.runtime import Runtime
from flask_multiprocess_controller.states import TaskStatus
from flask_multiprocess_controller.store import MemoryStore
from flask_multiprocess_controller.engine.supervisor import Outcome, StopReason, TaskRun
from flask_multiprocess_controller.task import MetaMPTask

from fakes import FakeClock, event

LOGGER = logging.getLogger("test-runtime-events")
CTL = "ctl"
OTHER = "otherhost:4242:1.0"
#: Every event kind that frees no place and queues nothing.
QUIET_KINDS = ["started", "progress", "stopping", "paused", "resumed", "adopted", "purged"]


class Noop(MetaMPTask):
    def execute(self) -> None:
        return None


class Setup:
    def __init__(self) -> None:
        self.mono = FakeClock(500.0)
        #: The store's clock; it starts where the events of fakes.event are stamped.
        self.clock = FakeClock()
        self.store = MemoryStore(clock=self.clock)
        config = RuntimeConfig(
            name=CTL, target_task=Noop, max_num_process=2, stop_grace=1.0, max_memory=None, max_tasks_per_child=1,
            retention=3600.0, lease=30.0, logger=LOGGER, configurator=DefaultMPLoggerConfigurator,
            limits=Limits(result_bytes=10_000, progress_bytes=10_000), slots=0)
        # No slot threads and no fork server: only the decisions are exercised.
        self.runtime = Runtime(config, self.store, None, fork_server=None, clock=self.mono)  # type: ignore[arg-type]
        self.wakes: list[Any] = []
        self.runtime.notify_work = self.wakes.append  # type: ignore[method-assign]
        self.run_wakes = 0

    @property
    def owner(self) -> str:
        return self.runtime.owner

    def run(self, uuid: str = "task-1", attempt: int = 1) -> TaskRun:
        """A run of ``uuid`` registered as running in this process."""
        def wake() -> None:
            self.run_wakes += 1

        made = TaskRun(uuid, None, wake, attempt=attempt)
        self.runtime.register(made)
        return made

    def on(self, ev: Event) -> None:
        self.runtime._on_event(ev)


@pytest.fixture
def setup() -> Iterator[Setup]:
    made = Setup()
    yield made
    made.store.close()


# -- waking idle slots -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["queued", "requeued"])
def test_work_queued_wakes_one_slot(setup: Setup, kind: str) -> None:
    setup.on(event("1", kind, emitter=OTHER, status="queued", attempt=0))
    assert setup.wakes == [1]


def test_an_end_frees_a_place_and_wakes_one_slot(setup: Setup) -> None:
    setup.on(event("1", "ended", emitter=OTHER, status="succeeded", attempt=1))
    assert setup.wakes == [1]


def test_an_end_whose_place_the_writing_slot_kept_wakes_none(setup: Setup) -> None:
    # Runtime.record notes the cursor when the slot that wrote the end claimed its next task in the same write.
    setup.runtime._places_kept.add("7")
    setup.on(event("7", "ended", emitter=setup.owner, status="succeeded", attempt=1))
    assert setup.wakes == []
    setup.on(event("7", "ended", emitter=setup.owner, status="succeeded", attempt=1))  # noted once only
    assert setup.wakes == [1]


@pytest.mark.parametrize("kind", QUIET_KINDS)
def test_other_events_wake_no_slot(setup: Setup, kind: str) -> None:
    setup.on(event("1", kind, emitter=OTHER, status="running", attempt=1))
    assert setup.wakes == []


def test_an_end_wakes_its_waiters_with_the_task(setup: Setup) -> None:
    ended = event("3", "ended", uuid="waited", emitter=OTHER, status="failed", attempt=1)
    with setup.runtime.watch("waited") as waiting, setup.runtime.watch("other-task") as other:
        setup.on(event("2", "progress", uuid="waited", emitter=OTHER, status="running", attempt=1))
        assert not waiting.is_set()
        setup.on(ended)
        assert waiting.is_set() and waiting.task == ended["task"]
        assert not other.is_set()


# -- the runs of this process ---------------------------------------------------------------------------------


def test_a_stop_request_stops_the_local_run(setup: Setup) -> None:
    run = setup.run()
    setup.on(event("1", "stopping", emitter=OTHER, status="stopping", attempt=1, stop_requested=True))
    assert run.stop_reason is StopReason.REQUESTED
    assert setup.run_wakes == 1  # its controlling thread is woken to act on it


def test_a_start_that_carries_a_stop_request_stops_the_local_run(setup: Setup) -> None:
    run = setup.run()
    setup.on(event("1", "started", emitter=setup.owner, status="running", attempt=1, stop_requested=True))
    assert run.stop_reason is StopReason.REQUESTED


def test_events_of_another_attempt_are_not_about_the_local_run(setup: Setup) -> None:
    run = setup.run(attempt=2)
    setup.on(event("1", "stopping", emitter=OTHER, status="stopping", attempt=1))
    setup.on(event("2", "ended", emitter=OTHER, status="lost", attempt=1))
    assert (run.stop_reason, run.abandoned, setup.run_wakes) == (None, False, 0)


@pytest.mark.parametrize("kind, status", [("ended", "lost"), ("requeued", "queued")])
def test_a_task_settled_by_another_process_is_abandoned_here(setup: Setup, kind: str, status: str) -> None:
    run = setup.run()
    setup.on(event("1", kind, emitter=OTHER, status=status, attempt=1))
    assert run.abandoned and run.stop_reason is None


@pytest.mark.parametrize("kind, status", [("ended", "succeeded"), ("requeued", "queued")])
def test_the_process_own_settlement_abandons_nothing(setup: Setup, kind: str, status: str) -> None:
    run = setup.run()
    setup.on(event("1", kind, emitter=setup.owner, status=status, attempt=1))
    assert not run.abandoned


def test_a_pause_and_a_resume_are_followed(setup: Setup) -> None:
    run = setup.run()  # the task is not in the store: the event's word stands
    setup.on(event("1", "paused", emitter=OTHER, status="paused", attempt=1))
    assert run.pause_wanted
    setup.on(event("2", "resumed", emitter=OTHER, status="running", attempt=1))
    assert not run.pause_wanted
    assert setup.run_wakes == 2


def test_a_late_pause_event_yields_to_the_store(setup: Setup) -> None:
    setup.store.enqueue([{"uuid": "task-1", "controller": CTL, "status": "queued", "priority": 0, "args": {},
                          "created_at": 1.0, "attempt": 0, "stop_requested": False}], -1)
    claimed = setup.store.claim(CTL, setup.owner, 2)
    assert claimed is not None and claimed["status"] == "running"
    run = setup.run(attempt=claimed["attempt"])
    run.request_pause(True)  # paused by an earlier event
    # Paused, then resumed, through two other processes: the pause event arrives after the resume was stored.
    setup.on(event("1", "paused", emitter=OTHER, status="paused", attempt=claimed["attempt"]))
    assert not run.pause_wanted


def test_a_start_recorded_as_paused_pauses_the_run(setup: Setup) -> None:
    run = setup.run()
    setup.on(event("1", "started", emitter=setup.owner, status="paused", attempt=1))
    assert run.pause_wanted and run.stop_reason is None


def test_progress_and_adoption_leave_the_run_alone(setup: Setup) -> None:
    run = setup.run()
    for cursor, kind in enumerate(["progress", "adopted"]):
        setup.on(event(str(cursor), kind, emitter=OTHER, status="running", attempt=1))
    assert (run.stop_reason, run.abandoned, run.pause_wanted, setup.run_wakes) == (None, False, False, 0)


# -- a sibling's shutdown -------------------------------------------------------------------------------------


def shutdown_end(cursor: str, emitter: str) -> Event:
    return event(cursor, "ended", emitter=emitter, status="stopped", attempt=1,
                 error={"type": "Shutdown", "message": "the server shut down", "traceback": None})


def test_a_sibling_shutting_down_holds_claims_for_a_moment(setup: Setup) -> None:
    assert setup.runtime.may_claim()
    setup.on(shutdown_end("1", OTHER))
    assert not setup.runtime.may_claim()
    setup.mono.advance(defaults.SIBLING_SHUTDOWN_HOLD - 0.001)
    assert not setup.runtime.may_claim()
    setup.mono.advance(0.001)
    assert setup.runtime.may_claim()


def test_a_claim_the_hold_held_back_goes_back_to_the_queue_when_the_process_shuts_down(setup: Setup) -> None:
    # The sibling's end is read a moment after it was written, and the hold runs from the read: the slot it
    # held claims as it lapses, later than a hold after the end. This process then handles its own SIGTERM
    # (late, as a loaded machine may), and its shutdown cuts the task short: it must not end ``stopped``.
    end = shutdown_end("1", OTHER)
    assert end["at"] == setup.clock()
    setup.on(end)
    feed_delay, claim_time = 0.3, 0.05
    setup.mono.advance(defaults.SIBLING_SHUTDOWN_HOLD)
    setup.clock.advance(feed_delay + defaults.SIBLING_SHUTDOWN_HOLD + claim_time)
    assert setup.runtime.may_claim()

    def shut_down(uuid: str) -> dict:
        setup.store.enqueue([{"uuid": uuid, "controller": CTL, "status": "queued", "priority": 0, "args": {},
                              "created_at": 1.0, "timeout": None, "attempt": 0, "stop_requested": False}], -1)
        row = setup.store.claim(CTL, setup.owner, 2)
        assert row is not None and row["uuid"] == uuid
        run = TaskRun(uuid, None, lambda: None, attempt=row["attempt"], claimed_at=row["started_at"])
        run.request_stop(StopReason.SHUTDOWN)
        outcome = Outcome(TaskStatus.STOPPED, {"ended_at": setup.clock(), "error": error_record(
            "Shutdown", "The task was stopped because its server shut down.")}, child_alive=False)
        setup.runtime.record(run, outcome, Retrier(LOGGER, threading.Event()), claim_next=False)
        stored = setup.store.get(uuid)
        assert stored is not None
        return stored

    held = shut_down("held")
    assert (held["status"], held["attempt"], held.get("owner")) == ("queued", 0, None), held
    setup.store.request_stop("held")  # out of the queue
    # A task claimed long after a sibling's shutdown is this process's own: its shutdown stops it.
    setup.clock.advance(10 * defaults.SIBLING_SHUTDOWN_HOLD)
    later = shut_down("later")
    assert (later["status"], later["error"]["type"]) == ("stopped", "Shutdown"), later


def test_the_process_own_shutdown_end_holds_nothing(setup: Setup) -> None:
    setup.on(shutdown_end("1", setup.owner))
    assert setup.runtime.may_claim()


def test_other_ends_hold_nothing(setup: Setup) -> None:
    setup.on(event("1", "ended", emitter=OTHER, status="failed", attempt=1,
                   error={"type": "ValueError", "message": "no", "traceback": None}))
    assert setup.runtime.may_claim()
