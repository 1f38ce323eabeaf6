"""The claim rules (store/claimrules.py) on every store: drained hosts, per-key and per-tenant bounds, held
tenants, a host's capacity and fair share between tenants, honoured by the four claim methods.

Each store gets the rules with the claim and must honour them in the claim's atomic step; these tests drive
the stores directly (no processes), one claim at a time, so the order of claims is exact.
"""
from __future__ import annotations

import time
import uuid as uuid_module
from typing import Any, Iterator, Optional

import pytest

from flask_multiprocess_controller import MemoryStore, SQLiteStore, TaskStore
from flask_multiprocess_controller.store.claimrules import ClaimRules
from flask_multiprocess_controller.store.postgres import PostgresStore
from flask_multiprocess_controller.store.redis import RedisStore

CTL = "rules"
OTHER = "rules-other"
HOST_A = "host-a"
HOST_B = "host-b"
GIB = 2 ** 30


def owner_on(host: str, n: int = 1) -> str:
    """A serving process's owner id on ``host`` (``host:pid:create_time``)."""
    return f"{host}:{1000 + n}:{1700000000.0 + n}"


A1 = owner_on(HOST_A, 1)
A2 = owner_on(HOST_A, 2)
B1 = owner_on(HOST_B, 1)


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store(request: Any, tmp_path: Any) -> Iterator[TaskStore]:
    """A fresh, empty store of each kind (Redis and PostgreSQL only started for their own cases)."""
    kind = request.param
    if kind == "memory":
        made: TaskStore = MemoryStore()
    elif kind == "sqlite":
        made = SQLiteStore(str(tmp_path / "rules.sqlite3"))
    elif kind == "redis":
        made = RedisStore(request.getfixturevalue("redis_url"), prefix=f"rules-{uuid_module.uuid4().hex}:")
    else:
        made = PostgresStore(request.getfixturevalue("postgres_url"), schema=f"rules_{uuid_module.uuid4().hex[:12]}")
    yield made
    made.close()


def add(store: TaskStore, n: int = 1, controller: str = CTL, *, priority: int = 0, tenant: Optional[str] = None,
        key: Optional[str] = None, resources: Optional[dict[str, Any]] = None) -> list[str]:
    """Queue ``n`` tasks (in that order) and return their uuids."""
    rows = [{"uuid": str(uuid_module.uuid4()), "controller": controller, "status": "queued", "priority": priority,
             "args": {}, "created_at": time.time(), "timeout": None, "attempt": 0, "stop_requested": False,
             "tenant": tenant, "concurrency_key": key, "resources": resources} for _ in range(n)]
    store.enqueue(rows, -1)  # type: ignore[arg-type]
    return [row["uuid"] for row in rows]


def claim(store: TaskStore, rules: ClaimRules, owner: str = A1, controller: str = CTL,
          max_running: int = 1000) -> Optional[str]:
    """The uuid of the task a claim takes, or None."""
    row = store.claim(controller, owner, max_running, rules)
    return None if row is None else row["uuid"]


def end(store: TaskStore, uuid: str, owner: str = A1) -> None:
    assert store.finish(uuid, "succeeded", owner=owner) is not None


def status_of(store: TaskStore, uuid: str) -> str:
    row = store.get(uuid)
    assert row is not None
    return row["status"]


# -- drained hosts -------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_drained_host_claims_nothing_and_an_undrained_one_does(store):
    first, second = add(store, 2)
    store.set_drained(HOST_A, True)
    on_a, on_b = ClaimRules(host=HOST_A), ClaimRules(host=HOST_B)
    assert claim(store, on_a) is None
    assert store.claim_started(CTL, A1, 10, 4242, 1.0, on_a) is None
    assert status_of(store, first) == "queued"
    assert claim(store, on_b, owner=B1) == first  # another host is not drained
    assert claim(store, ClaimRules()) == second  # a claim that names no host reads no drain flag
    (third,) = add(store)
    store.set_drained(HOST_A, False)
    assert claim(store, on_a) == third


# -- per key -------------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_max_per_key_holds_a_key_back_without_holding_up_the_tasks_behind_it(store):
    k1, k1_again = add(store, 2, key="k1")
    (k2,) = add(store, key="k2")
    (keyless, keyless_again) = add(store, 2)
    rules = ClaimRules(host=HOST_A, max_per_key=1)
    assert claim(store, rules) == k1
    assert claim(store, rules, owner=A2) == k2  # k1 is at its bound, whichever process claims
    assert claim(store, rules) == keyless  # no key: bounded by nothing but the global limit
    assert claim(store, rules, owner=B1) == keyless_again
    assert claim(store, rules) is None
    assert status_of(store, k1_again) == "queued"
    end(store, k1)
    assert claim(store, rules) == k1_again


@pytest.mark.timeout(30)
def test_max_per_key_counts_the_controllers_own_tasks_only(store):
    (other,) = add(store, controller=OTHER, key="k")
    (mine,) = add(store, key="k")
    rules = ClaimRules(max_per_key=1)
    assert claim(store, rules, controller=OTHER) == other
    assert claim(store, rules) == mine  # the other controller's task of key "k" does not count
    (more,) = add(store, key="k")
    assert claim(store, rules) is None  # its own is
    assert claim(store, ClaimRules(max_per_key=2)) == more


@pytest.mark.timeout(30)
def test_stopping_tasks_count_against_max_per_key(store):
    (first,) = add(store, key="k")
    (second,) = add(store, key="k")
    rules = ClaimRules(max_per_key=1)
    assert claim(store, rules) == first
    store.request_stop(first)
    assert status_of(store, first) == "stopping"
    assert claim(store, rules) is None
    end(store, first)
    assert claim(store, rules) == second


# -- per tenant and held tenants -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_max_per_tenant_bounds_each_tenant_but_not_tasks_of_no_tenant(store):
    a1, a2 = add(store, 2, tenant="a")
    (b1,) = add(store, tenant="b")
    none1, none2 = add(store, 2)
    rules = ClaimRules(max_per_tenant=1, fair=False)
    assert claim(store, rules) == a1
    assert claim(store, rules, owner=B1) == b1
    assert claim(store, rules) == none1
    assert claim(store, rules) == none2
    assert claim(store, rules) is None
    end(store, a1)
    assert claim(store, rules) == a2


@pytest.mark.timeout(30)
def test_tasks_of_held_tenants_are_skipped(store):
    (a1,) = add(store, tenant="a")
    (none1,) = add(store)
    (b1,) = add(store, tenant="b")
    held = ClaimRules(held_tenants=frozenset({"a", None}), fair=False)
    assert claim(store, held) == b1
    assert claim(store, held) is None
    assert claim(store, ClaimRules(fair=False)) == a1
    assert claim(store, ClaimRules(held_tenants=frozenset({"a"}), fair=False)) == none1


# -- capacity ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_task_is_claimed_only_when_it_fits_beside_the_hosts_running_tasks(store):
    big1, big2 = add(store, 2, resources={"memory": 6 * GIB, "cpus": 2})
    gpu, gpu_again = add(store, 2, resources={"gpu": 1})
    (small,) = add(store, resources={"memory": 1 * GIB, "cpus": 1})
    (plain,) = add(store)
    rules = ClaimRules(host=HOST_A, capacity={"memory": 8 * GIB, "cpus": 4})
    assert claim(store, rules) == big1
    # big2 does not fit beside big1 (12 GiB > 8), nor gpu (the host has none): the tasks behind them go.
    assert claim(store, rules) == small
    assert claim(store, rules) == plain
    assert claim(store, rules) is None
    assert status_of(store, big2) == "queued" and status_of(store, gpu) == "queued"
    end(store, big1)
    assert claim(store, rules, owner=A2) == big2  # fits once big1 ended (6 + 1 GiB, 3 cpus)
    assert claim(store, rules) is None
    assert claim(store, ClaimRules(host=HOST_A)) == gpu  # no capacity: claimed whatever it declares
    assert claim(store, ClaimRules(capacity={"cpus": 4})) == gpu_again  # no host: no capacity counted


@pytest.mark.timeout(30)
def test_capacity_counts_every_controllers_tasks_on_the_host_and_no_other_hosts(store):
    (theirs_on_a,) = add(store, controller=OTHER, resources={"memory": 5 * GIB})
    (theirs_on_b,) = add(store, controller=OTHER, resources={"memory": 5 * GIB})
    assert claim(store, ClaimRules(), owner=A2, controller=OTHER) == theirs_on_a
    assert claim(store, ClaimRules(), owner=B1, controller=OTHER) == theirs_on_b
    mine1, mine2 = add(store, 2, resources={"memory": 4 * GIB})
    on_a = ClaimRules(host=HOST_A, capacity={"memory": 8 * GIB})
    on_b = ClaimRules(host=HOST_B, capacity={"memory": 16 * GIB})
    assert claim(store, on_a) is None  # 5 GiB of another controller run on host A: 9 > 8
    assert claim(store, on_b, owner=B1) == mine1  # host B's 5 GiB + 4 fit its 16
    end(store, theirs_on_a, owner=A2)
    assert claim(store, on_a) == mine2  # host B's tasks never counted on host A


@pytest.mark.timeout(30)
def test_finish_and_claim_honours_the_capacity(store):
    (big,) = add(store, resources={"memory": 6 * GIB})
    (big_too,) = add(store, resources={"memory": 6 * GIB})
    (small,) = add(store, resources={"memory": 1 * GIB})
    rules = ClaimRules(host=HOST_A, capacity={"memory": 8 * GIB})
    assert claim(store, rules) == big
    (running,) = add(store, controller=OTHER)
    assert claim(store, ClaimRules(), controller=OTHER) == running
    event, row = store.finish_and_claim(running, "succeeded", A1, CTL, 10, rules)
    assert event is not None and row is not None and row["uuid"] == small  # big_too does not fit yet
    event, claimed = store.finish_and_claim_started(big, "succeeded", A1, CTL, 10, 4242, 1.0, rules)
    assert event is not None and claimed is not None and claimed[0]["uuid"] == big_too
    assert claimed[0]["pid"] == 4242 and claimed[1]["kind"] == "started"


# -- the four claim methods ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_claim_started_and_finish_and_claim_honour_the_rules(store):
    (k1,) = add(store, key="k1")
    (k1_again,) = add(store, key="k1")
    (k2,) = add(store, key="k2")
    (held,) = add(store, key="k3", tenant="held")
    (k4,) = add(store, key="k4")
    rules = ClaimRules(host=HOST_A, max_per_key=1, held_tenants=frozenset({"held"}))
    claimed = store.claim_started(CTL, A1, 10, 4242, 1.0, rules)
    assert claimed is not None and claimed[0]["uuid"] == k1
    (other,) = add(store, controller=OTHER)
    assert claim(store, rules, controller=OTHER) == other
    event, row = store.finish_and_claim(other, "succeeded", A1, CTL, 10, rules)
    assert event is not None and row is not None and row["uuid"] == k2  # k1 again is held back by its key
    event, claimed = store.finish_and_claim_started(k2, "succeeded", A1, CTL, 10, 4343, 1.0, rules)
    assert event is not None and claimed is not None and claimed[0]["uuid"] == k4  # the held tenant's is skipped
    store.set_drained(HOST_A, True)
    event, row = store.finish_and_claim(k1, "succeeded", A1, CTL, 10, rules)
    assert event is not None and row is None  # a drained host claims nothing, k1 again included
    assert status_of(store, k1_again) == "queued" and status_of(store, held) == "queued"


# -- fair share ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_tenant_with_five_tasks_is_not_starved_by_one_with_two_hundred(store):
    many = add(store, 200, tenant="a")
    few = set(add(store, 5, tenant="b"))
    rules = ClaimRules(host=HOST_A)  # fair share by default
    order: list[str] = []
    running: list[str] = []
    for _ in range(4):
        uuid = claim(store, rules)
        assert uuid is not None
        order.append(uuid)
        running.append(uuid)
    while len(order) < 16:  # ends and claims alternate
        event, row = store.finish_and_claim(running.pop(0), "succeeded", A1, CTL, 4, rules)
        assert event is not None and row is not None
        order.append(row["uuid"])
        running.append(row["uuid"])
    assert few <= set(order[:10]), [("b" if u in few else "a") for u in order]
    assert [u for u in order if u not in few] == many[:len(order) - 5]  # each tenant's own oldest first


@pytest.mark.timeout(30)
def test_the_tenant_with_fewer_running_tasks_goes_next_unless_fair_share_is_off(store):
    a_tasks = add(store, 6, tenant="a")
    assert [claim(store, ClaimRules()) for _ in range(3)] == a_tasks[:3]
    b_tasks = add(store, 4, tenant="b")
    assert claim(store, ClaimRules(fair=False)) == a_tasks[3]  # without fair share, the oldest
    assert [claim(store, ClaimRules()) for _ in range(4)] == b_tasks  # b has fewer running (0..3 < 4)
    assert claim(store, ClaimRules()) == a_tasks[4]


@pytest.mark.timeout(30)
def test_priority_comes_before_fair_share(store):
    a_tasks = add(store, 3, tenant="a")
    assert claim(store, ClaimRules()) == a_tasks[0]
    (b_first,) = add(store, tenant="b")
    (b_later,) = add(store, tenant="b", priority=5)
    assert claim(store, ClaimRules()) == b_first  # fewer running than a, at the same priority
    # a runs 1 then 2 tasks, b 1: a's tasks of priority 0 still go before b's of priority 5.
    assert [claim(store, ClaimRules()) for _ in range(2)] == a_tasks[1:]
    assert claim(store, ClaimRules()) == b_later


@pytest.mark.timeout(30)
def test_the_global_limit_still_bounds_claims_with_rules(store):
    first, second = add(store, 2, tenant="a", key="k")
    (third,) = add(store, tenant="b", key="k")
    rules = ClaimRules(host=HOST_A, max_per_key=2, max_per_tenant=1, capacity={"cpus": 8})
    assert claim(store, rules, max_running=2) == first
    assert claim(store, rules, max_running=2) == third  # a is at its bound of 1
    assert claim(store, rules, max_running=3) is None  # k is at its bound of 2
    assert status_of(store, second) == "queued"


def one_slot_claims(store: TaskStore, count: int, rules: ClaimRules = ClaimRules(host=HOST_A)) -> list[str]:
    """The uuids of ``count`` claims with one slot, each claimed as the task before it ends (none runs before)."""
    first = claim(store, rules, max_running=1)
    assert first is not None
    order = [first]
    while len(order) < count:
        event, row = store.finish_and_claim(order[-1], "succeeded", A1, CTL, 1, rules)
        assert event is not None and row is not None
        order.append(row["uuid"])
    end(store, order[-1])
    return order


@pytest.mark.timeout(60)
def test_with_one_slot_tenants_take_turns_rather_than_the_oldest_winning_every_tie(store):
    many = add(store, 200, tenant="a")
    few = add(store, 5, tenant="b")
    order = one_slot_claims(store, 10)
    assert order == [task for pair in zip(many, few) for task in pair], [("b" if u in few else "a") for u in order]


@pytest.mark.timeout(60)
def test_three_tenants_rotate_and_a_tenant_claimed_alone_is_still_the_latest_claimed(store):
    a_tasks, b_tasks, c_tasks = add(store, 6, tenant="a"), add(store, 3, tenant="b"), add(store, 3)
    order = one_slot_claims(store, 9)
    assert order == [task for trio in zip(a_tasks, b_tasks, c_tasks) for task in trio]
    assert one_slot_claims(store, 2) == a_tasks[3:5]  # a alone waits: claimed as before any other tenant came
    (b_late,) = add(store, tenant="b")
    (c_late,) = add(store)
    # b and c were last claimed before a's claims alone: they go first, in the order of their last claims.
    assert one_slot_claims(store, 3) == [b_late, c_late, a_tasks[5]]
