"""The event hub, stepped one feed read at a time (no thread, no sleep): publishing, subscribing,
following the feed of other processes, resets."""
from __future__ import annotations

import logging

import pytest

from flask_multiprocess_controller.events import Changes, Event
from flask_multiprocess_controller.exceptions import StoreUnavailable
from flask_multiprocess_controller.engine.hub import EventHub
from flask_multiprocess_controller.store import MemoryStore

from fakes import FeedStore, event

LOGGER = logging.getLogger("test-hub-steps")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.resets = 0

    def __call__(self, ev: Event) -> None:
        self.seen.append(ev["cursor"])

    def reset(self) -> None:
        self.resets += 1


def hub_of(store, recorder: Recorder) -> tuple[EventHub, Recorder]:
    """A hub of controller ``ctl`` with ``recorder`` on every event and another on local ones only."""
    hub = EventHub(store, "ctl", LOGGER, on_reset=recorder.reset)
    local = Recorder()
    hub.subscribe(recorder)
    hub.subscribe(local, local_only=True)
    return hub, local


def test_published_events_reach_every_subscriber_in_order() -> None:
    store = FeedStore()
    everything = Recorder()
    hub, local = hub_of(store, everything)
    hub.start(thread=False)
    hub.publish(event("11", "queued", emitter="me"))
    hub.publish(None)  # a write that changed nothing
    hub.publish_all([event("12", "started", emitter="me"), event("13", "ended", emitter="me")])
    assert everything.seen == local.seen == ["11", "12", "13"]
    assert store.calls == []  # publishing never reads the feed


def test_the_feed_reaches_only_subscribers_of_every_event() -> None:
    store = FeedStore([Changes([event("11", "queued"), event("12", "started")], "12", False)])
    everything = Recorder()
    hub, local = hub_of(store, everything)
    hub.start(thread=False)
    hub.step(1.0)
    assert everything.seen == ["11", "12"]
    assert local.seen == []  # callbacks and log lines belong to the process that wrote the event


def test_the_feed_is_followed_from_its_end_cursor_by_cursor() -> None:
    store = FeedStore([Changes([event("11", "queued")], "11", False), Changes([], "11", False),
                       Changes([event("12", "ended")], "12", False)], latest="10")
    hub, _ = hub_of(store, Recorder())
    hub.start(thread=False)
    for _ in range(3):
        hub.step(0.5)
    # The follower waits for other processes' events only, from where the previous read ended.
    assert store.calls == [("10", 0.5, True), ("11", 0.5, True), ("11", 0.5, True)]


def test_events_of_other_controllers_are_ignored() -> None:
    store = FeedStore([Changes([event("11", "queued", controller="other-ctl"), event("12", "queued")], "12", False)])
    everything = Recorder()
    hub, _ = hub_of(store, everything)
    hub.start(thread=False)
    hub.step(1.0)
    assert everything.seen == ["12"]


def test_an_event_published_here_is_not_dispatched_again_from_the_feed() -> None:
    mine = event("11", "queued", emitter="me")
    store = FeedStore([Changes([mine, event("12", "started")], "12", False)])
    everything = Recorder()
    hub, _ = hub_of(store, everything)
    hub.start(thread=False)
    hub.publish(mine)
    hub.step(1.0)
    assert everything.seen == ["11", "12"]


def test_a_reset_asks_for_a_re_read_and_the_events_after_it_still_arrive() -> None:
    store = FeedStore([Changes([event("40", "ended")], "40", True), Changes([event("41", "queued")], "41", False)])
    everything = Recorder()
    hub, _ = hub_of(store, everything)
    hub.start(thread=False)
    hub.step(1.0)
    assert (everything.resets, everything.seen) == (1, ["40"])
    hub.step(1.0)
    assert (everything.resets, everything.seen) == (1, ["40", "41"])
    assert store.calls[-1][0] == "40"


def test_a_failing_subscriber_does_not_starve_the_others(caplog) -> None:
    store = FeedStore([Changes([event("11", "queued")], "11", False)])
    hub = EventHub(store, "ctl", LOGGER, on_reset=lambda: None)
    after = Recorder()

    def broken(ev: Event) -> None:
        raise RuntimeError("consumer bug")

    hub.subscribe(broken)
    hub.subscribe(after)
    hub.start(thread=False)
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        hub.publish(event("10", "queued", emitter="me"))
        hub.step(1.0)
    assert after.seen == ["10", "11"]
    assert [r.getMessage() for r in caplog.records] == ["Handling task event queued of task-1 failed."] * 2


def test_catch_up_reads_what_was_written_so_far_and_rides_out_an_outage() -> None:
    store = FeedStore([Changes([event("11", "queued")], "11", False)])
    everything = Recorder()
    hub, _ = hub_of(store, everything)
    hub.catch_up()  # not started: nothing to read
    assert store.calls == []
    hub.start(thread=False)
    store.fail_with = StoreUnavailable("down", 1.0)
    hub.catch_up()  # the follower catches up once the store is back
    hub.catch_up()
    assert everything.seen == ["11"]
    assert store.calls == [("10", 0.0, False), ("10", 0.0, False)]


def test_a_store_of_one_process_has_no_feed_to_follow() -> None:
    store = MemoryStore()
    everything = Recorder()
    hub, local = hub_of(store, everything)
    hub.start(thread=False)
    events = store.enqueue([{"uuid": "u", "controller": "ctl", "status": "queued", "priority": 0, "args": {},
                             "created_at": 1.0, "attempt": 0, "stop_requested": False}], -1)
    hub.publish_all(events)
    hub.catch_up()
    assert everything.seen == local.seen == [events[0]["cursor"]]


def test_a_stopped_hub_reads_no_more() -> None:
    store = FeedStore([Changes([event("11", "queued")], "11", False)])
    everything = Recorder()
    hub, _ = hub_of(store, everything)
    hub.start(thread=False)
    hub.stop()
    hub.catch_up()
    assert (store.calls, everything.seen) == ([], [])


@pytest.mark.parametrize("kind", ["progress", "purged"])
def test_every_kind_is_dispatched_alike(kind: str) -> None:
    store = FeedStore([Changes([event("11", kind)], "11", False)])
    everything = Recorder()
    hub, _ = hub_of(store, everything)
    hub.start(thread=False)
    hub.step(1.0)
    assert everything.seen == ["11"]
