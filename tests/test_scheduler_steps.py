"""The scheduler, stepped round by round on a memory store with fake clocks (no thread, no sleep):
firings due at given times, missed firings and catch-up, a full queue, losing and taking the lease."""
from __future__ import annotations

import logging
import pytest

from flask_multiprocess_controller import defaults
from flask_multiprocess_controller.events import Event
from flask_multiprocess_controller.engine.schedules import ScheduleSpec, Scheduler
from flask_multiprocess_controller.store import MemoryStore

from fakes import FakeClock

LOGGER = logging.getLogger("test-scheduler-steps")
CTL = "ctl"
LEASE = 30.0
#: A whole multiple of a minute: an ``every=60`` schedule fires at T0 + 60 k.
T0 = 1_700_000_040.0


class Setup:
    """A memory store on a fake UNIX clock, and schedulers on one fake monotonic clock."""

    def __init__(self) -> None:
        self.wall = FakeClock(T0 + 5)
        self.mono = FakeClock(100.0)
        self.store = MemoryStore(clock=self.wall)
        self.published: list[Event] = []

    def scheduler(self, owner: str = "owner-a", max_queued: int = -1, *specs: ScheduleSpec) -> Scheduler:
        made = Scheduler(self.store, CTL, owner, LEASE, max_queued, LOGGER, self.published.append, clock=self.mono)
        for spec in specs or (ScheduleSpec.build("minutely", every=60),):
            made.add(spec)
        return made

    def at(self, moment: float) -> None:
        """Move both clocks to store time ``moment``."""
        self.mono.advance(moment - self.wall.now)
        self.wall.set(moment)

    def firings(self) -> list[float]:
        return [task["schedule"]["firing"] for task in reversed(self.store.list_tasks(CTL))]

    def state(self, name: str = "minutely") -> dict:
        return next(s for s in self.store.schedules(CTL) if s["name"] == name)


@pytest.fixture
def setup() -> Setup:
    return Setup()


def test_the_first_round_declares_takes_the_lease_and_fires_nothing_old(setup: Setup) -> None:
    scheduler = setup.scheduler()
    pause = scheduler.run_once()
    assert scheduler.holder
    assert setup.state()["fired_until"] == T0 + 5  # declared now: only later firings count
    assert setup.firings() == []
    assert pause == LEASE / 3  # the renewal comes before the next firing (T0 + 60)


def test_a_firing_due_queues_one_task_once(setup: Setup) -> None:
    scheduler = setup.scheduler()
    scheduler.run_once()
    setup.at(T0 + 59)
    scheduler.run_once()
    assert setup.firings() == []
    setup.at(T0 + 60)
    pause = scheduler.run_once()
    assert setup.firings() == [T0 + 60]
    assert [e["kind"] for e in setup.published] == ["queued"]
    assert setup.published[0]["task"]["schedule"] == {"name": "minutely", "firing": T0 + 60}
    scheduler.run_once()  # the same moment again: nothing new
    assert setup.firings() == [T0 + 60]
    assert setup.state()["last_fired"] == T0 + 60
    assert setup.state()["last_task"] == setup.published[0]["uuid"]
    assert pause == 9.0  # the renewal made at T0 + 59 (its round was due) comes again at T0 + 69


def test_the_round_sleeps_until_the_next_firing_when_it_comes_before_the_renewal(setup: Setup) -> None:
    scheduler = setup.scheduler()
    scheduler.run_once()
    setup.at(T0 + 55)
    assert scheduler.run_once() == pytest.approx(5 + defaults.SCHEDULE_WAKE_MARGIN)


def test_firings_late_within_the_grace_are_all_queued(setup: Setup) -> None:
    spec = ScheduleSpec.build("fast", every=10)
    scheduler = setup.scheduler("owner-a", -1, spec)
    scheduler.run_once()
    setup.at(T0 + 10 + defaults.SCHEDULE_GRACE - 1)  # T0 + 10, 20, 30 are late, the first by just < grace
    scheduler.run_once()
    assert setup.firings() == [T0 + 10, T0 + 20, T0 + 30]


@pytest.mark.parametrize("catchup, queued", [("skip", []), ("one", [T0 + 600])])
def test_firings_missed_while_no_server_ran(setup: Setup, catchup: str, queued: list[float]) -> None:
    spec = ScheduleSpec.build("minutely", every=60, catchup=catchup)
    scheduler = setup.scheduler("owner-a", -1, spec)
    scheduler.run_once()
    setup.at(T0 + 600 + defaults.SCHEDULE_GRACE + 10)  # ten firings missed, none within the grace
    scheduler.run_once()
    assert setup.firings() == queued
    assert setup.state()["fired_until"] == T0 + 600
    scheduler.run_once()
    assert setup.firings() == queued  # handled once


def test_a_firing_on_time_after_an_outage_is_queued_and_the_missed_ones_are_passed_over(setup: Setup) -> None:
    spec = ScheduleSpec.build("minutely", every=60, catchup="one")
    scheduler = setup.scheduler("owner-a", -1, spec)
    scheduler.run_once()
    setup.at(T0 + 600 + 1)
    scheduler.run_once()
    assert setup.firings() == [T0 + 600]  # the on-time firing stands for the missed ones


def test_a_full_queue_skips_the_firing_and_counts_it(setup: Setup) -> None:
    scheduler = setup.scheduler("owner-a", 0)
    scheduler.run_once()
    setup.at(T0 + 60)
    scheduler.run_once()
    assert setup.firings() == [] and setup.published == []
    assert (setup.state()["skipped"], setup.state()["last_skipped"]) == (1, T0 + 60)
    setup.at(T0 + 120)
    scheduler.run_once()
    assert (setup.state()["skipped"], setup.state()["last_skipped"]) == (2, T0 + 120)
    assert setup.state()["fired_until"] == T0 + 120


def test_only_the_lease_holder_fires(setup: Setup) -> None:
    first, second = setup.scheduler("owner-a"), setup.scheduler("owner-b")
    first.run_once()
    pause = second.run_once()
    assert (first.holder, second.holder) == (True, False)
    assert pause == LEASE / 3  # it looks again at its next renewal
    setup.at(T0 + 60)
    first.run_once()
    second.run_once()
    assert setup.firings() == [T0 + 60]
    assert {e["emitter"] for e in setup.published} == {"owner-a"}


def test_a_holder_that_stopped_renewing_loses_the_lease_to_another(setup: Setup, caplog) -> None:
    first, second = setup.scheduler("owner-a"), setup.scheduler("owner-b")
    first.run_once()
    second.run_once()
    setup.at(T0 + 60)  # 55 s on: the first process renewed nothing for longer than the lease
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        second.run_once()
        first.run_once()
    assert (first.holder, second.holder) == (False, True)
    assert setup.firings() == [T0 + 60]
    assert {e["emitter"] for e in setup.published} == {"owner-b"}
    assert "This process no longer fires the schedules of ctl." in caplog.messages


def test_stopping_gives_the_lease_up_at_once(setup: Setup) -> None:
    first, second = setup.scheduler("owner-a"), setup.scheduler("owner-b")
    first.run_once()
    second.run_once()
    first.stop()
    assert not first.holder
    setup.mono.advance(LEASE / 3)  # the second's next renewal, long before the first's lease would expire
    second.run_once()
    assert second.holder


def test_a_schedule_added_later_is_declared_at_the_next_round(setup: Setup) -> None:
    scheduler = setup.scheduler()
    scheduler.run_once()
    scheduler.add(ScheduleSpec.build("hourly", every=3600))
    scheduler.run_once()  # no renewal was due, but a new schedule is declared at once
    assert sorted(s["name"] for s in setup.store.schedules(CTL)) == ["hourly", "minutely"]


def test_two_holders_at_once_still_queue_each_firing_once(setup: Setup) -> None:
    first, second = setup.scheduler("owner-a"), setup.scheduler("owner-b")
    first.run_once()
    second.run_once()
    second.holder = True  # as if it still believed in a lease it lost: neither renews in the next round
    setup.wall.set(T0 + 60)
    first.run_once()
    second.run_once()
    assert setup.firings() == [T0 + 60]
