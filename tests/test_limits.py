"""Limits above ``max_num_process``: concurrency keys and declared resources stamped on every submit path, host
capacity (cgroups, ``MPC_RESOURCES``), a task too large for every host refused (422), tenant quotas (429 with
``Retry-After``, ``<prefix>/api/usage``), and the ``waiting_on`` / ``waiting_for`` a queued task shows."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from flask_restful import Api

from conftest import wait_until
from flask_multiprocess_controller import MetaMPResource, MetaMPTask, MultiprocessController, defaults
from flask_multiprocess_controller.exceptions import QuotaExceeded, ResourcesUnavailable
from flask_multiprocess_controller.limits import (
    cgroup_limits, host_capacity, parse_amount, parse_capacity, parse_resources,
)
from flask_multiprocess_controller.store.base import Row
from flask_multiprocess_controller.waiting import QueueState, waiting_for, waiting_on

GIB = 1024 ** 3


class Keyed(MetaMPTask):
    """Declares a little memory and half a CPU; waits for ``gate`` (none: returns at once)."""

    resources = {"memory": "2GiB", "cpus": 0.5}

    def execute(self, account: str = "none", gate: str = "") -> str:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.02)
        return account


class Gated(MetaMPTask):
    def execute(self, account: str = "none", gate: str = "") -> str:
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.02)
        return account


class NeedsGpus(MetaMPTask):
    resources = {"gpu": 2, "memory": "1GiB"}

    def execute(self) -> None:
        pass


class Burns(MetaMPTask):
    """Works ``seconds`` of CPU."""

    def execute(self, seconds: float = 0.3) -> None:
        until = time.process_time() + seconds
        while time.process_time() < until:
            pass


# -- declarations and capacity, without processes ---------------------------------------------------------------

def test_amounts_declarations_and_the_host_capacity(tmp_path: Path) -> None:
    assert parse_amount("6GiB") == 6 * GIB and parse_amount("512M") == 512e6 and parse_amount("1.5k") == 1500
    assert parse_amount(2) == 2.0 and parse_amount("4Ki") == 4096
    for bad in ("6 XB", "-1", "Gi", "i"):
        with pytest.raises(ValueError):
            parse_amount(bad)
    assert parse_resources({"memory": "6GiB", "cpus": 2, "gpu": 1}) == {"memory": 6 * GIB, "cpus": 2.0, "gpu": 1.0}
    with pytest.raises(TypeError, match="dict of resource name"):
        parse_resources(["memory"])
    with pytest.raises(ValueError, match=r"Bad.resources\['memory'\]"):
        class Bad(MetaMPTask):  # refused when the class is made, not at the first submit
            resources = {"memory": "lots"}

            def execute(self) -> None:
                pass
    assert Keyed.declared_resources == {"memory": 2 * GIB, "cpus": 0.5}
    assert parse_capacity("memory=16GiB, cpus=4,gpu=1") == {"memory": 16 * GIB, "cpus": 4.0, "gpu": 1.0}
    with pytest.raises(ValueError, match="name=amount"):
        parse_capacity("gpu")

    # cgroup v2: the tightest limit on the way up to the root; "max" is no limit.
    v2 = tmp_path / "v2"
    (v2 / "app" / "worker").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "app" / "memory.max").write_text(f"{4 * GIB}\n")
    (v2 / "app" / "worker" / "memory.max").write_text("max\n")
    (v2 / "app" / "worker" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "cgroup2").write_text("0::/app/worker\n")
    assert cgroup_limits(str(v2), str(tmp_path / "cgroup2")) == {"memory": 4 * GIB, "cpus": 1.5}
    # cgroup v1: a huge memory limit and a quota of -1 are no limits.
    v1 = tmp_path / "v1"
    (v1 / "memory" / "box").mkdir(parents=True)
    (v1 / "cpu" / "box").mkdir(parents=True)
    (v1 / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    (v1 / "cpu" / "box" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "box" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cgroup1").write_text("5:memory:/box\n4:cpu,cpuacct:/box\n")
    assert cgroup_limits(str(v1), str(tmp_path / "cgroup1")) == {"memory": float(GIB), "cpus": 2.0}
    (v1 / "memory" / "box" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (v1 / "cpu" / "box" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_limits(str(v1), str(tmp_path / "cgroup1")) == {}

    detected = host_capacity({})
    assert detected["memory"] > 0 and detected["cpus"] >= 1
    assert host_capacity({"MPC_RESOURCES": "cpus=64,gpu=2"}) == {**detected, "cpus": 64.0, "gpu": 2.0}


def _state(**changes: Any) -> QueueState:
    values: dict[str, Any] = dict(max_num_process=4, held=1, paused=0, median=None, drained=False, read_at=1000.0)
    values.update(changes)
    return QueueState(**values)


def test_waiting_on_names_the_limit_a_queued_task_waits_on() -> None:
    row: Row = {"uuid": "u", "status": "queued", "retry_at": None, "tenant": "acme",  # type: ignore[typeddict-item]
                "concurrency_key": "k1", "resources": {"memory": 6 * GIB, "gpu": 1}}
    hosts = (({"memory": 8 * GIB, "gpu": 1}, {"memory": 4 * GIB}), ({"memory": 64 * GIB}, {}))
    full = dict(held_tenants=frozenset({"acme"}), hosts=hosts, keys={"k1": 2}, max_per_key=2,
                tenants={"acme": 3}, max_per_tenant=3)
    seen = []
    for drop in ("held_tenants", "hosts", "keys", "tenants", None):
        state = _state(**full)
        seen.append((waiting_on(row, 1, state), waiting_for(row, 1, state)))
        if drop:
            full.pop(drop)
    # Quota first; resources name what every host lacks (memory on the first, gpu on the second); then the
    # key, the tenant; a free place at last.
    assert seen == [("quota", "acme"), ("resources", "gpu, memory"), ("key", "k1"), ("tenant", "acme"),
                    ("slot", None)], seen
    roomy = _state(hosts=(({"memory": 8 * GIB, "gpu": 1}, {"memory": GIB}),))
    assert waiting_on(row, 1, roomy) == "slot", "a host has room for it"
    assert waiting_on(row, 1, _state(keys={"k1": 1}, max_per_key=2)) == "slot"


# -- on the rows, with real task processes -----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_every_submit_path_stamps_the_key_and_the_resources(make_client, make_controller, monkeypatch) -> None:
    client, controller = make_client(Keyed, concurrency_key="account", max_per_key=1)
    assert controller.max_memory == 2 * GIB, "max_memory defaults to the declared memory"
    declared = {"memory": 2 * GIB, "cpus": 0.5}

    def stamped(uuid: str) -> tuple:
        task = controller.status(uuid)
        return task["concurrency_key"], task["resources"]

    first = controller.submit(account="a")
    assert stamped(first) == ("a", declared)
    assert [t["concurrency_key"] for t in controller.enqueue([{"account": "b"}, {}])] == ["b", "none"], \
        "a missing argument is keyed by its default"
    assert [t["concurrency_key"] for t in controller.submit_many([{"account": "c"}]).tasks] == ["c"]
    posted = client.post("/tasks", json=[{"account": "d"}, {"account": "e"}]).get_json()["tasks"]
    assert [(t["concurrency_key"], t["resources"]) for t in posted] == [("d", declared), ("e", declared)]
    ended = controller.wait(first, timeout=30)
    assert ended["status"] == "succeeded", ended
    assert stamped(controller.rerun(first)["uuid"]) == ("a", declared)
    controller.schedule("nightly", every=1, kwargs={"account": "s"})
    fired = wait_until(lambda: [t for t in controller.tasks()["tasks"] if t["schedule"]], timeout=15)
    assert stamped(fired[0]["uuid"]) == ("s", declared)

    by_tenant = make_controller(Gated, concurrency_key=lambda args, tenant: f"{tenant}/{args.get('account')}",
                                max_per_key=2)
    assert by_tenant.enqueue([{"account": "x"}], tenant="acme")[0]["concurrency_key"] == "acme/x"
    assert by_tenant.status(by_tenant.submit())["resources"] is None, "its class declares nothing"
    with pytest.raises(ValueError, match="not a parameter"):
        make_controller(Gated, concurrency_key="acount")
    with pytest.raises(ValueError, match="max_per_key"):
        make_controller(Gated, max_per_key=0)


@pytest.mark.timeout(60)
def test_a_task_larger_than_every_host_is_refused_with_the_largest_capacity(make_client, monkeypatch) -> None:
    monkeypatch.setenv("MPC_RESOURCES", "gpu=1")
    client, controller = make_client(NeedsGpus)
    answer = client.post("/tasks", json={})
    assert answer.status_code == 422, answer.get_json()
    message = answer.get_json()["message"]
    assert "gpu 2" in message and "largest capacity seen is gpu 1, memory" in message, message
    with pytest.raises(ResourcesUnavailable):
        controller.submit()
    assert controller.tasks()["tasks"] == [], "nothing was queued"
    assert controller.store.capacities()[controller.runtime.host]["gpu"] == 1.0


@pytest.mark.timeout(60)
def test_a_key_held_back_shows_its_reason_while_other_keys_wait_for_a_slot(make_client, tmp_path: Path,
                                                                           monkeypatch) -> None:
    monkeypatch.setattr(defaults, "QUEUE_STATE_TTL", 0.0)
    client, controller = make_client(Gated, concurrency_key="account", max_per_key=1, max_num_process=1)
    gate = tmp_path / "gate"
    running = client.post("/tasks", json={"account": "a", "gate": str(gate)}).get_json()["uuid"]
    wait_until(lambda: controller.status(running)["status"] == "running", timeout=20)
    same = client.post("/tasks", json={"account": "a"}).get_json()
    other = client.post("/tasks", json={"account": "b"}).get_json()
    assert (same["waiting_on"], same["waiting_for"]) == ("key", "a"), same
    assert (other["waiting_on"], other["waiting_for"]) == ("slot", None), other
    gate.touch()
    for uuid in (running, same["uuid"], other["uuid"]):
        assert controller.wait(uuid, timeout=30)["status"] == "succeeded"


@pytest.mark.timeout(60)
def test_a_tenant_over_its_quota_gets_429_until_its_usage_leaves_the_window(make_controller) -> None:
    controller = make_controller(Burns, tenant=lambda: request.headers.get("X-Tenant"), tenant_quota=(0.2, 3))
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app)
    client = app.test_client()
    acme = {"X-Tenant": "acme"}
    burnt = client.post("/tasks", json={"seconds": 0.3}, headers=acme).get_json()["uuid"]
    ended = controller.wait(burnt, timeout=30)
    assert ended["status"] == "succeeded" and ended["cpu_time"] >= 0.2, ended
    refused = wait_until(lambda: (lambda r: r if r.status_code == 429 else None)(
        client.post("/tasks", json={"seconds": 0}, headers=acme)), timeout=5)
    assert "quota" in refused.get_json()["message"] and 1 <= int(refused.headers["Retry-After"]) <= 4, \
        (refused.headers, refused.get_json())
    assert client.post("/tasks", json={"seconds": 0}, headers={"X-Tenant": "bob"}).status_code == 202, \
        "another tenant is not held"
    usage = client.get("/mpc/api/usage", headers=acme).get_json()["usage"]
    [mine] = usage[0]["tenants"]
    assert (usage[0]["quota"], usage[0]["window"], mine["tenant"], mine["over"]) == (0.2, 3.0, "acme", True), usage
    assert mine["cpu_seconds"] >= 0.2 and mine["retry_after"] >= 1, mine
    with pytest.raises(QuotaExceeded):
        controller.enqueue([{"seconds": 0}], tenant="acme")
    # Recovery: once the burnt task's end leaves the window, acme submits again.
    later = wait_until(lambda: (lambda r: r if r.status_code == 202 else None)(
        client.post("/tasks", json={"seconds": 0}, headers=acme)), timeout=10, interval=0.2)
    assert controller.wait(later.get_json()["uuid"], timeout=30)["status"] == "succeeded"
    assert controller.status(controller.submit(seconds=0))["status"] in ("queued", "running", "succeeded"), \
        "the system's tasks are bounded by no quota"
