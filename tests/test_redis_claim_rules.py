"""The claim rules on the Redis store, where they rest on indexes of its own that every change must keep in step:
each tenant's ready queue (reprioritised, requeued and retried tasks move in it), the set of the tasks holding
a host's resources (an adopted task's move to another host), and the filling of the ready queues of a key
space written before they existed. The rules themselves are tested on every store in test_claim_rules.py.
"""
from __future__ import annotations

import time
import uuid as uuid_module
from typing import Any, Iterator, Optional

import pytest
import redis

from flask_multiprocess_controller.store.claimrules import ClaimRules
from flask_multiprocess_controller.store.redis import RedisStore

CTL = "redis-rules"
A1 = "host-a:1001:1700000001.0"
B1 = "host-b:1001:1700000001.0"
GIB = 2 ** 30
#: Rules that are not plain (a per-key bound), so that a claim reads the tenants' ready queues.
BOUNDED = ClaimRules(max_per_key=100)


@pytest.fixture
def store(redis_url: str) -> Iterator[RedisStore]:
    made = RedisStore(redis_url, prefix=f"rr-{uuid_module.uuid4().hex}:")
    yield made
    made.close()


def add(store: RedisStore, n: int = 1, *, tenant: Optional[str] = None,
        resources: Optional[dict[str, Any]] = None) -> list[str]:
    rows = [{"uuid": str(uuid_module.uuid4()), "controller": CTL, "status": "queued", "priority": 0, "args": {},
             "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False, "tenant": tenant,
             "resources": resources} for _ in range(n)]
    store.enqueue(rows, -1)  # type: ignore[arg-type]
    return [row["uuid"] for row in rows]


def claim(store: RedisStore, rules: ClaimRules, owner: str = A1) -> Optional[str]:
    row = store.claim(CTL, owner, 100, rules)
    return None if row is None else row["uuid"]


@pytest.mark.timeout(60)
def test_reprioritised_requeued_and_retried_tasks_move_in_their_tenants_ready_queue(store):
    first, second = add(store, 2, tenant="acme")
    (other,) = add(store, tenant="globex")
    store.reprioritise(other, -1)
    assert claim(store, BOUNDED) == other  # its new priority, not its old place
    assert store.requeue(other, A1) is not None
    assert claim(store, BOUNDED) == other  # back at its place
    assert store.retry(other, 0.0, A1) is not None
    # Due at once: the next claim puts it back into globex's ready queue, which that claim holds back.
    assert claim(store, ClaimRules(max_per_key=100, held_tenants=frozenset({"globex"}))) == first
    assert claim(store, BOUNDED) == other
    assert [claim(store, BOUNDED), claim(store, BOUNDED)] == [second, None]


@pytest.mark.timeout(60)
def test_an_adopted_task_holds_the_resources_of_its_new_owners_host(store):
    big = add(store, 3, resources={"memory": 6 * GIB})
    capacity = {"memory": 8 * GIB}
    on_a, on_b = ClaimRules(host="host-a", capacity=capacity), ClaimRules(host="host-b", capacity=capacity)
    assert claim(store, on_a, A1) == big[0]
    assert claim(store, on_a, A1) is None
    assert store.adopt(big[0], A1, B1) is not None
    assert claim(store, on_b, B1) is None  # host b runs it now
    assert claim(store, on_a, A1) == big[1]  # and host a has its memory back


@pytest.mark.timeout(60)
def test_a_key_space_written_before_the_ready_queues_is_shared_fairly_once_opened(store):
    many = add(store, 3, tenant="acme")
    (one,) = add(store, tenant="globex")
    client = redis.Redis.from_url(store.url)
    try:
        # As an older version left it: no ready queue per tenant, no marker.
        for key in [*client.scan_iter(match=f"{store.prefix}c:*:rq*"), f"{store.prefix}ready:indexed"]:
            client.delete(key)
        reopened = RedisStore(store.url, prefix=store.prefix)
        try:
            fair = ClaimRules()
            assert [claim(reopened, fair), claim(reopened, fair), claim(reopened, fair)] == [many[0], one, many[1]]
        finally:
            reopened.close()
    finally:
        client.close()
