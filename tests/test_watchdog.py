"""The stop escalation, the timeout and the end classification, with plain numbers for clocks.

No process runs here: the watchdog is told the time, and ``classify`` is given what a controlling
thread observed.
"""
from __future__ import annotations

import json

import pytest

from flask_multiprocess_controller.engine.proctree import TreeUsage
from flask_multiprocess_controller.engine.protocol import Done, Usage, error_record
from flask_multiprocess_controller.states import TaskStatus
from flask_multiprocess_controller.engine.supervisor import Observation, Settings, StopReason, classify
from flask_multiprocess_controller.engine.watchdog import Action, Schedule, Watchdog

pytestmark = pytest.mark.timeout(10)

SCHEDULE = Schedule(stop_grace=10.0, sample_every=0.5, flush_every=0.25, kill_after_term=2.0)
QUIET = dict(stop_at=None, stopping=False, dirty=False, ended=False)


def test_nothing_is_due_before_the_first_sample():
    dog = Watchdog(SCHEDULE, started=100.0, timeout=None)
    assert dog.due(100.2, **QUIET) == []
    assert dog.sleep_for(100.2, **QUIET) == pytest.approx(0.3)
    assert dog.due(100.5, **QUIET) == [Action.SAMPLE]
    assert dog.sleep_for(100.5, **QUIET) == pytest.approx(0.5)


def test_a_long_task_is_sampled_less_often_after_its_warm_up():
    dog = Watchdog(Schedule(stop_grace=10.0, sample_every=0.5, sample_every_later=2.0, sample_warmup=5.0),
                   started=100.0, timeout=None)
    assert dog.due(104.5, **QUIET) == [Action.SAMPLE]  # still warming up: the next one in 0.5 s
    assert dog.sleep_for(104.5, **QUIET) == pytest.approx(0.5)
    assert dog.due(105.0, **QUIET) == [Action.SAMPLE]  # warmed up: every 2 s from now on
    assert dog.sleep_for(105.0, **QUIET) == pytest.approx(2.0)
    assert dog.due(106.9, **QUIET) == []
    assert dog.due(107.0, **QUIET) == [Action.SAMPLE]


def test_timeout_is_due_once_at_the_deadline():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=3.0)
    assert Action.TIMEOUT not in dog.due(2.99, **QUIET)
    assert dog.sleep_for(2.99, **QUIET) == pytest.approx(0.01)
    assert Action.TIMEOUT in dog.due(3.0, **QUIET)
    # once a stop is under way the deadline no longer counts
    assert Action.TIMEOUT not in dog.due(3.1, stop_at=3.0, stopping=True, dirty=False, ended=False)


def test_stop_escalates_to_terminate_after_the_grace_then_to_kill():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=None)
    stopping = dict(stop_at=1.0, stopping=True, dirty=False, ended=False)
    assert [a for a in dog.due(10.9, **stopping) if a is not Action.SAMPLE] == []
    assert dog.sleep_for(10.9, **stopping) == pytest.approx(0.1)
    assert Action.TERMINATE in dog.due(11.0, **stopping)
    assert Action.TERMINATE not in dog.due(11.5, **stopping), "SIGTERM is sent once"
    assert Action.KILL not in dog.due(12.9, **stopping)
    assert dog.sleep_for(12.9, **stopping) == pytest.approx(0.1)
    assert Action.KILL in dog.due(13.0, **stopping)
    assert dog.killed
    later = dog.due(20.0, **stopping)
    assert Action.KILL not in later and Action.TERMINATE not in later


def test_no_escalation_once_the_task_reported_its_end_or_was_killed():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=None)
    assert Action.TERMINATE not in dog.due(50.0, stop_at=1.0, stopping=True, dirty=False, ended=True)
    other = Watchdog(SCHEDULE, started=0.0, timeout=None)
    other.killed_now()
    assert Action.TERMINATE not in other.due(50.0, stop_at=1.0, stopping=True, dirty=False, ended=False)


def test_zero_grace_terminates_at_once():
    dog = Watchdog(Schedule(stop_grace=0.0, sample_every=0.5), started=0.0, timeout=None)
    assert Action.TERMINATE in dog.due(0.1, stop_at=0.1, stopping=True, dirty=False, ended=False)


def test_progress_is_flushed_at_a_bounded_rate():
    dog = Watchdog(SCHEDULE, started=0.0, timeout=None)
    dirty = dict(stop_at=None, stopping=False, dirty=True, ended=False)
    assert Action.FLUSH not in dog.due(0.2, **dirty)
    assert Action.FLUSH in dog.due(0.25, **dirty)
    assert Action.FLUSH not in dog.due(0.3, **dirty)
    assert dog.sleep_for(0.3, **dirty) == pytest.approx(0.2)
    assert Action.FLUSH in dog.due(0.5, **dirty)


# -- classification ---------------------------------------------------------------------------------

SETTINGS = Settings(stop_grace=10.0, max_memory=1000, fresh_process=True)


def observe(**kwargs: object) -> Observation:
    base = dict(stop_reason=None, done=None, exited=True, exit_code=0, timeout=None, ended_at=5.0)
    base.update(kwargs)
    return Observation(**base)  # type: ignore[arg-type]


def test_a_result_succeeds_with_usage_from_the_report():
    done = Done("u", "ok", result_json=json.dumps({"x": 1}), usage=Usage(cpu_time=0.5, maxrss=2048))
    outcome = classify(observe(done=done, progress="p", percent=50.0), SETTINGS)
    assert outcome.status is TaskStatus.SUCCEEDED
    assert outcome.fields["result"] == {"x": 1}
    assert outcome.fields["cpu_time"] == 0.5 and outcome.fields["memory_peak"] == 2048
    assert outcome.fields["progress"] == "p" and outcome.fields["percent"] == 50.0
    assert outcome.fields["ended_at"] == 5.0 and outcome.fields["exit_code"] == 0


def test_an_error_report_fails_with_that_error():
    error = error_record("ValueError", "bad", "Traceback ...")
    outcome = classify(observe(done=Done("u", "error", error=error)), SETTINGS)
    assert outcome.status is TaskStatus.FAILED and outcome.fields["error"] == error


@pytest.mark.parametrize("code, words", [(-11, "SIGSEGV"), (3, "exited with code 3"), (-9, "SIGKILL")])
def test_a_process_that_died_without_a_report_failed(code, words):
    outcome = classify(observe(exit_code=code), SETTINGS)
    assert outcome.status is TaskStatus.FAILED
    assert outcome.fields["error"]["type"] == "ProcessDied"
    assert words in outcome.fields["error"]["message"]
    assert outcome.fields["exit_code"] == code and not outcome.child_alive


def test_a_checkpointed_stop_is_stopped_without_error():
    outcome = classify(observe(stop_reason=StopReason.REQUESTED, done=Done("u", "aborted")), SETTINGS)
    assert outcome.status is TaskStatus.STOPPED and "error" not in outcome.fields


def test_a_stop_that_needed_a_kill_says_so():
    outcome = classify(observe(stop_reason=StopReason.REQUESTED, exit_code=-9), SETTINGS)
    assert outcome.status is TaskStatus.STOPPED
    assert outcome.fields["error"]["type"] == "Killed"
    assert "did not stop within 10 s" in outcome.fields["error"]["message"]


def test_timeout_and_shutdown_and_memory():
    timed = classify(observe(stop_reason=StopReason.TIMEOUT, done=Done("u", "aborted"), timeout=2.0), SETTINGS)
    assert timed.status is TaskStatus.TIMED_OUT and timed.fields["error"]["type"] == "TaskTimeout"
    assert "timeout of 2 s" in timed.fields["error"]["message"]
    shut = classify(observe(stop_reason=StopReason.SHUTDOWN, done=Done("u", "aborted")), SETTINGS)
    assert shut.status is TaskStatus.STOPPED and shut.fields["error"]["type"] == "Shutdown"
    usage = TreeUsage(memory_peak=5000, memory_now=4000)
    memory = classify(observe(stop_reason=StopReason.MEMORY, exit_code=-9, usage=usage), SETTINGS)
    assert memory.status is TaskStatus.FAILED
    assert memory.fields["error"]["type"] == "MemoryLimitExceeded"
    assert "4000 bytes" in memory.fields["error"]["message"] and memory.fields["memory_peak"] == 5000


def test_a_reused_process_that_is_still_alive_is_reported_alive():
    reused = Settings(stop_grace=1.0, max_memory=None, fresh_process=False)
    outcome = classify(observe(done=Done("u", "ok", result_json="1"), exited=False, exit_code=None), reused)
    assert outcome.status is TaskStatus.SUCCEEDED and outcome.child_alive
    assert outcome.fields["exit_code"] is None
