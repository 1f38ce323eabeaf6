"""The pure parts of the task policies, with plain numbers for clocks: no process, no store.

The watchdog's timeout clock while a task is paused, the retry policy's decisions and backoff, the
checking of PATCH bodies, and which firings of a schedule are queued, passed over or caught up.
"""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from flask_multiprocess_controller import InvalidRequest, MetaMPTask, ProcessDied, TaskFailure, TaskTimeout
from flask_multiprocess_controller.http.patching import TaskChange, parse_change
from flask_multiprocess_controller.engine.retries import RetryPolicy
from flask_multiprocess_controller.engine.schedules import Plan, ScheduleSpec, plan
from flask_multiprocess_controller.engine.watchdog import Action, Schedule, Watchdog

pytestmark = pytest.mark.timeout(10)

SCHEDULE = Schedule(stop_grace=10.0, sample_every=100.0, flush_every=0.25, kill_after_term=2.0)
#: A schedule whose timeout does not count paused time (``timeout_while_paused=False``).
FROZEN = Schedule(stop_grace=10.0, sample_every=100.0, flush_every=0.25, kill_after_term=2.0,
                  timeout_while_paused=False)
QUIET = dict(stop_at=None, stopping=False, dirty=False, ended=False)


# -- the watchdog's clock while paused --------------------------------------------------------------------

def test_the_timeout_clock_stops_while_paused_when_told_so():
    dog = Watchdog(FROZEN, started=0.0, timeout=10.0)
    dog.pause(4.0)
    assert Action.TIMEOUT not in dog.due(50.0, **QUIET), "no timeout while paused"
    assert dog.sleep_for(50.0, **QUIET) == pytest.approx(50.0), "the deadline does not wake a paused task"
    dog.resume(60.0)  # paused 56 s: 6 s of running time are left
    assert dog.deadline == pytest.approx(66.0)
    assert Action.TIMEOUT not in dog.due(65.9, **QUIET)
    assert dog.sleep_for(65.9, **QUIET) == pytest.approx(0.1)
    assert Action.TIMEOUT in dog.due(66.0, **QUIET)


def test_several_pauses_add_up_and_repeated_calls_change_nothing():
    dog = Watchdog(FROZEN, started=0.0, timeout=5.0)
    dog.pause(1.0)
    dog.pause(2.0)  # already paused: the first moment counts
    dog.resume(3.0)
    dog.resume(9.0)  # not paused: nothing moves
    dog.pause(4.0)
    dog.resume(5.5)
    assert dog.deadline == pytest.approx(5.0 + 2.0 + 1.5)
    assert Action.TIMEOUT not in dog.due(8.4, **QUIET)
    assert Action.TIMEOUT in dog.due(8.5, **QUIET)


def test_without_a_timeout_pausing_only_records_the_pause():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=None)
    dog.pause(1.0)
    assert dog.paused_since == 1.0 and dog.deadline is None
    dog.resume(3.0)
    assert dog.paused_since is None and dog.deadline is None
    assert Action.TIMEOUT not in dog.due(1e9, **QUIET)


def test_by_default_the_timeout_counts_the_time_paused():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=10.0)
    dog.pause(4.0)
    assert Action.TIMEOUT not in dog.due(9.9, **QUIET)
    assert dog.sleep_for(9.9, **QUIET) == pytest.approx(0.1), "the deadline wakes a paused task"
    assert Action.TIMEOUT in dog.due(10.0, **QUIET), "a paused task times out on time"
    dog.resume(12.0)
    assert dog.deadline == pytest.approx(10.0), "a resume does not move the deadline"


def test_a_pause_longer_than_max_pause_is_due_to_end_once_then_again_if_it_goes_on():
    dog = Watchdog(Schedule(stop_grace=10.0, sample_every=100.0, max_pause=30.0, pause_retry=5.0),
                   started=0.0, timeout=None)
    assert Action.PAUSE_EXPIRED not in dog.due(1000.0, **QUIET), "not paused: nothing to end"
    dog.pause(1000.0)
    dog.pause(1010.0)  # already paused: the first moment counts
    assert Action.PAUSE_EXPIRED not in dog.due(1029.9, **QUIET)
    assert dog.sleep_for(1029.9, **QUIET) == pytest.approx(0.1), "the end of the pause wakes the thread"
    assert Action.PAUSE_EXPIRED in dog.due(1030.0, **QUIET)
    assert Action.PAUSE_EXPIRED not in dog.due(1031.0, **QUIET), "asked once"
    assert Action.PAUSE_EXPIRED in dog.due(1035.0, **QUIET), "asked again when the pause did not end"
    stopping = dict(stop_at=1036.0, stopping=True, dirty=False, ended=False)
    assert Action.PAUSE_EXPIRED not in dog.due(1041.0, **stopping), "a stop under way wins"
    dog.resume(1042.0)
    assert Action.PAUSE_EXPIRED not in dog.due(5000.0, **QUIET), "resumed: nothing to end"
    dog.pause(5000.0)  # a new pause gets the whole max_pause
    assert Action.PAUSE_EXPIRED not in dog.due(5029.0, **QUIET)
    assert Action.PAUSE_EXPIRED in dog.due(5030.0, **QUIET)


@pytest.mark.parametrize("max_pause", [None, 0.0])
def test_without_max_pause_a_pause_never_ends_by_itself(max_pause):
    dog = Watchdog(Schedule(stop_grace=10.0, sample_every=100.0, max_pause=max_pause), started=0.0, timeout=None)
    dog.pause(1.0)
    assert dog.sleep_for(1.0, **QUIET) == pytest.approx(99.0), "only the sample wakes it"
    assert Action.PAUSE_EXPIRED not in dog.due(1e9, **QUIET)


def test_a_pause_does_not_change_the_stop_escalation():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=100.0)
    dog.pause(1.0)
    stopping = dict(stop_at=2.0, stopping=True, dirty=False, ended=False)
    dog.resume(2.0)
    assert Action.TERMINATE in dog.due(12.0, **stopping)
    assert Action.KILL in dog.due(14.0, **stopping)


# -- retry policy -----------------------------------------------------------------------------------------

class Flaky(MetaMPTask):
    max_retries = 3
    retry_backoff = 2.0
    retry_backoff_max = 5.0

    def execute(self) -> None:
        pass


class Narrow(Flaky):
    retry_on = (ValueError, TaskTimeout)


def test_backoff_doubles_with_jitter_up_to_its_maximum():
    policy = RetryPolicy.of(Flaky)
    assert [policy.delay(n, lambda: 0.0) for n in range(4)] == [1.0, 2.0, 2.5, 2.5], "half of the full pause"
    assert [policy.delay(n, lambda: 0.999999) for n in range(4)] == pytest.approx([2.0, 4.0, 5.0, 5.0])
    assert policy.delay(10_000, lambda: 0.5) == pytest.approx(3.75), "huge exponents stay at the maximum"
    assert RetryPolicy(max_retries=1, backoff=0.0).delay(3) == 0.0


def test_which_ends_are_retried():
    default, narrow = RetryPolicy.of(Flaky), RetryPolicy.of(Narrow)
    error = {"type": "ValueError", "message": "m", "traceback": None}
    assert default.next_delay("failed", error, True, False, 0) is not None
    assert default.next_delay("failed", error, True, False, 3) is None, "no retries left"
    assert default.next_delay("failed", error, True, True, 0) is None, "a stop is never retried"
    assert default.next_delay("stopped", None, None, False, 0) is None
    assert default.next_delay("failed", error, False, False, 0) is None, "the task process said no match"
    for kind in ("ProcessDied", "TaskTimeout", "MemoryLimitExceeded"):
        crash = {"type": kind, "message": "m", "traceback": None}
        assert default.next_delay("failed", crash, None, False, 0) is None, f"{kind} needs naming"
    timeout = {"type": "TaskTimeout", "message": "m", "traceback": None}
    assert narrow.next_delay("timed_out", timeout, None, False, 0) is not None
    died = {"type": "ProcessDied", "message": "m", "traceback": None}
    assert narrow.next_delay("failed", died, None, False, 0) is None
    assert RetryPolicy(max_retries=1, retry_on=(TaskFailure,)).next_delay("failed", died, None, False, 0) is not None
    assert RetryPolicy(max_retries=1, retry_on=(ProcessDied,)).retries_failure("ProcessDied")


def test_exceptions_raised_by_execute_match_retry_on_by_class():
    default, narrow = RetryPolicy.of(Flaky), RetryPolicy.of(Narrow)
    assert default.retries_raised(KeyError("k")) and default.retries_raised(ValueError("v"))
    assert not default.retries_raised(KeyboardInterrupt())
    assert narrow.retries_raised(UnicodeDecodeError("utf-8", b"", 0, 1, "bad")), "subclasses match"
    assert not narrow.retries_raised(KeyError("k"))


@pytest.mark.parametrize("attributes, error", [
    ({"max_retries": -1}, ValueError), ({"max_retries": 1.5}, ValueError), ({"max_retries": True}, ValueError),
    ({"retry_backoff": -1}, ValueError), ({"retry_backoff": float("inf")}, ValueError),
    ({"retry_backoff_max": "10"}, ValueError), ({"retry_on": "ValueError"}, TypeError),
    ({"retry_on": (ValueError, 3)}, TypeError), ({"retry_on": ()}, TypeError),
])
def test_bad_retry_settings_are_refused_when_read(attributes, error):
    task = type("Bad", (Flaky,), attributes)
    with pytest.raises(error, match="Bad"):
        RetryPolicy.of(task)


def test_a_single_exception_class_is_a_retry_on():
    assert RetryPolicy.of(type("One", (Flaky,), {"retry_on": ValueError})).retry_on == (ValueError,)


# -- PATCH bodies -----------------------------------------------------------------------------------------

def test_patch_bodies_ask_for_one_change():
    assert parse_change({"status": "paused", "uuid": "u"}) == TaskChange(status="paused")
    assert parse_change({"status": "running"}) == TaskChange(status="running")
    assert parse_change({"priority": -3}) == TaskChange(priority=-3)


@pytest.mark.parametrize("body", [
    {}, {"uuid": "u"}, {"status": "stopped"}, {"status": "queued"}, {"status": 1}, {"status": ["paused"]},
    {"priority": "1"}, {"priority": 1.5}, {"priority": True}, {"priority": 2 ** 70}, {"priority": None},
    {"status": "paused", "priority": 1}, {"name": "x"}, {"status": "paused", "extra": 1},
])
def test_bad_patch_bodies_are_invalid_requests(body):
    with pytest.raises(InvalidRequest) as info:
        parse_change(body)
    assert info.value.message


# -- schedules ----------------------------------------------------------------------------------------------

def test_every_fires_at_whole_multiples_since_the_epoch():
    spec = ScheduleSpec.build("tick", every=60)
    assert spec.next_after(119.0) == 120.0 and spec.next_after(120.0) == 180.0
    assert spec.latest_until(120.0) == 120.0 and spec.latest_until(179.9) == 120.0


def test_cron_fires_in_its_time_zone():
    spec = ScheduleSpec.build("nightly", cron="30 2 * * *", tz="Europe/Paris")
    paris = ZoneInfo("Europe/Paris")
    start = datetime(2026, 1, 10, 12, 0, tzinfo=paris).timestamp()
    assert datetime.fromtimestamp(spec.next_after(start), paris) == datetime(2026, 1, 11, 2, 30, tzinfo=paris)
    at = datetime(2026, 1, 11, 2, 30, tzinfo=paris).timestamp()
    assert spec.latest_until(at) == at and spec.latest_until(at - 1) == at - 86400
    assert spec.next_after(at) == at + 86400


@pytest.mark.parametrize("kwargs, error", [
    ({}, ValueError), ({"cron": "* * * * *", "every": 5}, ValueError), ({"cron": "not cron"}, ValueError),
    ({"every": 0.5}, ValueError), ({"every": float("nan")}, ValueError), ({"every": True}, ValueError),
    ({"every": 5, "tz": "Mars/Olympus"}, ValueError), ({"every": 5, "catchup": "all"}, ValueError),
    ({"every": 5, "kwargs": [1]}, TypeError), ({"every": 5, "priority": "1"}, TypeError),
])
def test_bad_schedules_are_refused(kwargs, error):
    with pytest.raises(error):
        ScheduleSpec.build("s", **kwargs)
    with pytest.raises(ValueError):
        ScheduleSpec.build("", every=5)


def test_firings_on_time_are_queued_each_once():
    spec = ScheduleSpec.build("tick", every=10)
    assert plan(spec, fired_until=100.0, now=105.0) == Plan([])
    assert plan(spec, fired_until=100.0, now=110.0) == Plan([110.0])
    assert plan(spec, fired_until=110.0, now=110.5) == Plan([]), "a firing handled is not queued again"
    assert plan(spec, fired_until=100.0, now=125.0, grace=30.0) == Plan([110.0, 120.0]), "late within the grace"


def test_firings_missed_while_nothing_ran_are_skipped_by_default():
    spec = ScheduleSpec.build("tick", every=10)
    assert plan(spec, fired_until=100.0, now=1000.0, grace=30.0) == Plan([980.0, 990.0, 1000.0], 970.0)
    assert plan(spec, fired_until=100.0, now=1005.0, grace=2.0) == Plan([], 1000.0)


def test_catchup_one_queues_one_task_for_what_was_missed():
    spec = ScheduleSpec.build("tick", every=10, catchup="one")
    assert plan(spec, fired_until=100.0, now=1005.0, grace=2.0) == Plan([1000.0])
    assert plan(spec, fired_until=100.0, now=1000.0, grace=30.0) == Plan([980.0, 990.0, 1000.0], 970.0), \
        "firings on time cover what was missed"
    assert plan(spec, fired_until=1000.0, now=1005.0, grace=2.0) == Plan([]), "nothing missed, nothing queued"
