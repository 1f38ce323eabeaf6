"""``<prefix>/metrics``: the extension's figures in the Prometheus text format (prometheus-client, optional).

Every figure about tasks is read from the store at each scrape, by a collector whose ``collect()``
makes a few aggregate reads per controller (:class:`StoreCollector`), so whichever gunicorn worker
or host answers a scrape, it answers the same: the store is shared, no worker's memory is asked.
Two figures belong to the answering process and say so with ``host`` and ``pid`` labels: the
change-feed lag of its follower, and the store errors it met (those are added up over the workers of
a host instead, without ``pid``, when prometheus-client's multiprocess mode is on:
``PROMETHEUS_MULTIPROC_DIR`` set in the server's environment).

The wait-time and run-time histograms describe the tasks that ended in the last ``MPC_METRICS_WINDOW``
seconds (of the store's clock), read from the store's index of ended tasks: they are gauge histograms
(a window, not counters since the start), so ``histogram_quantile()`` takes their buckets as they are,
without ``rate()``.

Without prometheus-client installed the URL answers 404 with a JSON message saying how to install it.

.. versionadded:: 0.4
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue

from .. import defaults
from ..exceptions import MetricsUnavailable, StoreError, store_error_hooks, store_errors_seen
from ..states import ALL_STATUSES, TERMINAL, TaskStatus
from ..store.base import ANY_TENANT

if TYPE_CHECKING:
    from ..controller import MetaMPController
    from ..extension import MultiprocessController
    from ..store import TaskStore

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]

#: The environment variable that turns prometheus-client's multiprocess mode on (a directory).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The kinds of store errors always shown (at 0 until one is met).
STORE_ERROR_KINDS = ("StoreError", "StoreUnavailable")


def add_metrics(blueprint: Blueprint, extension: "MultiprocessController", wrap: Wrap) -> None:
    """Add ``/metrics`` to the extension's blueprint (wrapped like every extension view)."""
    blueprint.add_url_rule("/metrics", "metrics", wrap(_metrics_view(extension)))


def metrics_window() -> float:
    """The app's ``MPC_METRICS_WINDOW``: seconds of ended tasks the histograms describe."""
    value = current_app.config.get("MPC_METRICS_WINDOW", defaults.METRICS_WINDOW)
    window = float(value)
    if not window > 0:
        raise ValueError(f"MPC_METRICS_WINDOW must be a positive number of seconds, not {value!r}.")
    return window


def _metrics_view(extension: "MultiprocessController") -> Callable[[], ResponseReturnValue]:
    def metrics() -> ResponseReturnValue:
        try:
            from prometheus_client import CollectorRegistry
            from prometheus_client.exposition import choose_encoder
        except ImportError:
            raise MetricsUnavailable() from None
        controllers = list(extension.controllers())
        collector = StoreCollector(controllers, metrics_window(), {c.name: c.tenant_filter() for c in controllers})
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        if _multiprocess_dir():
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type, "Cache-Control": "no-cache"})

    return metrics


def _multiprocess_dir() -> Optional[str]:
    return os.environ.get(MULTIPROC_ENV) or None


class StoreCollector:
    """A prometheus-client collector of the controllers' figures, read from their stores at each ``collect()``.

    :param tenants: each controller's ``tenant=`` hook answer for the scraping request: a request limited
        to one tenant gets that tenant's task counts only, and none of the figures the store does not keep
        per tenant (histograms, retries, callbacks, feed lag).
    """

    def __init__(self, controllers: list["MetaMPController"], window: float, tenants: dict[str, Any]) -> None:
        self.controllers = controllers
        self.window = window
        self.tenants = tenants

    def collect(self) -> Iterator[Any]:
        """The metric families of one scrape (see the module's docstring and ``docs/metrics.md``)."""
        from prometheus_client.core import (CounterMetricFamily, GaugeHistogramMetricFamily,
                                            GaugeMetricFamily)

        by_controller = ["controller"]
        up = GaugeMetricFamily("mpc_store_up", "1 when the controller's store answered this scrape, else 0.",
                               labels=by_controller)
        tasks = GaugeMetricFamily("mpc_tasks", "Tasks kept in the store, by controller and status.",
                                  labels=["controller", "status"])
        depth = GaugeMetricFamily("mpc_queue_depth", "Queued tasks (those waiting for a retry included).",
                                  labels=by_controller)
        running = GaugeMetricFamily("mpc_tasks_running", "Tasks holding a process slot and not paused "
                                    "(running or stopping).", labels=by_controller)
        paused = GaugeMetricFamily("mpc_tasks_paused", "Paused tasks (they keep their slot).", labels=by_controller)
        ended = GaugeMetricFamily("mpc_tasks_ended_recent", "Tasks that ended within the metrics window, "
                                  "by terminal status (lost included).", labels=["controller", "status"])
        retries = GaugeMetricFamily("mpc_task_retries_recent", "Retries (attempts after the first) of the tasks "
                                    "that ended within the metrics window.", labels=by_controller)
        wait = GaugeHistogramMetricFamily("mpc_task_wait_seconds", "From submission to the start of the last "
                                          "attempt, of the tasks that ran and ended within the metrics window.",
                                          labels=by_controller)
        run = GaugeHistogramMetricFamily("mpc_task_run_seconds", "From the start of the last attempt to the end, "
                                         "of the tasks that ran and ended within the metrics window.",
                                         labels=by_controller)
        pending = GaugeMetricFamily("mpc_callbacks_pending", "Callbacks in the outbox, not delivered yet "
                                    "(controllers with a callback_url).", labels=by_controller)
        dropped = CounterMetricFamily("mpc_callbacks_dropped", "Callbacks dropped undelivered after "
                                      "callback_max_age, ever.", labels=by_controller)
        lag = GaugeMetricFamily("mpc_change_feed_lag_seconds", "Age of the oldest event of the store's change "
                                "feed this serving process has not read yet (0: caught up).",
                                labels=["controller", "host", "pid"])
        serving = GaugeMetricFamily("mpc_serving_processes", "Serving processes with a heartbeat in the store, "
                                    "by host.", labels=["host"])
        window = GaugeMetricFamily("mpc_metrics_window_seconds", "The window of the *_recent figures and of "
                                   "the histograms (MPC_METRICS_WINDOW).", value=self.window)
        clocks: dict[int, float] = {}
        stores: dict[int, "TaskStore"] = {}
        for controller in self.controllers:
            name = controller.name
            tenant = self.tenants.get(name, ANY_TENANT)
            try:
                store = controller.store
                if id(store) not in clocks:
                    clocks[id(store)] = store.now()
                    stores[id(store)] = store
                counts = store.counts(name, tenant=tenant)
                since = clocks[id(store)] - self.window
                recent = store.ended_counts(name, since, step=self.window * 2, tenant=tenant)
                whole = tenant is ANY_TENANT
                callbacks: Optional[tuple[int, int]] = None
                if whole:
                    timings = store.ended_timings(name, since)
                    if controller.callback_url:  # else the outbox is only cleared, never delivered
                        callbacks = store.callbacks_pending(name), store.callbacks_dropped(name)
                    feed_lag = _feed_lag(controller)
            except StoreError:
                up.add_metric([name], 0)
                continue
            up.add_metric([name], 1)
            for status in ALL_STATUSES:
                tasks.add_metric([name, status], counts.get(status, 0))
            depth.add_metric([name], counts.get(TaskStatus.QUEUED.value, 0))
            running.add_metric([name], counts.get(TaskStatus.RUNNING.value, 0) + counts.get(TaskStatus.STOPPING.value, 0))
            paused.add_metric([name], counts.get(TaskStatus.PAUSED.value, 0))
            for status in sorted(s.value for s in TERMINAL):
                ended.add_metric([name, status], sum(n for (_, s), n in recent.items() if s == status))
            if not whole:
                continue
            retries.add_metric([name], sum(max(0, t.attempt - 1) for t in timings))
            ran = [t for t in timings if t.started_at is not None]
            wait.add_metric([name], *_buckets(t.started_at - t.created_at for t in ran))  # type: ignore[operator]
            run.add_metric([name], *_buckets(t.ended_at - t.started_at for t in ran))  # type: ignore[operator]
            if callbacks is not None:
                pending.add_metric([name], callbacks[0])
                dropped.add_metric([name], callbacks[1])
            if feed_lag is not None:
                lag.add_metric([name, feed_lag[0], str(os.getpid())], feed_lag[1])
        for store in stores.values():
            try:
                for host, count in _serving_by_host(store).items():
                    serving.add_metric([host], count)
            except StoreError:
                pass
        yield from (up, tasks, depth, running, paused, ended, retries, wait, run, pending, dropped, lag, serving,
                    window)
        if not _multiprocess_dir():  # else MultiProcessCollector adds them up over the host's processes
            yield _store_errors_of_this_process(CounterMetricFamily)


def _buckets(values: Iterable[float]) -> tuple[list[tuple[str, float]], float]:
    """The cumulative buckets (``le``, count) of :data:`defaults.METRICS_BUCKETS` and +Inf, and the sum."""
    found = sorted(max(0.0, v) for v in values)
    buckets: list[tuple[str, float]] = []
    below = 0
    for bound in defaults.METRICS_BUCKETS:
        while below < len(found) and found[below] <= bound:
            below += 1
        buckets.append((repr(float(bound)), below))
    buckets.append(("+Inf", len(found)))
    return buckets, sum(found)


def _feed_lag(controller: "MetaMPController") -> Optional[tuple[str, float]]:
    """``(host, seconds)`` of this process's follower of the controller's feed, or None when it has none."""
    runtime = controller.local_runtime()
    if runtime is None:
        return None
    seconds = runtime.events.lag(runtime.owner)
    return None if seconds is None else (runtime.host, seconds)


def _serving_by_host(store: "TaskStore") -> dict[str, int]:
    from ..store.base import owner_host

    hosts: dict[str, int] = {}
    for owner in store.heartbeats():
        host = owner_host(owner) or "unknown"
        hosts[host] = hosts.get(host, 0) + 1
    return hosts


def _store_errors_of_this_process(family: Any) -> Any:
    from ..engine.owners import host_id

    seen = store_errors_seen()
    errors = family("mpc_store_errors", "Store errors this serving process met (StoreUnavailable: down or "
                    "locked), since it started.", labels=["kind", "host", "pid"])
    host, pid = host_id(), str(os.getpid())
    for kind in sorted(set(STORE_ERROR_KINDS) | set(seen)):
        errors.add_metric([kind, host, pid], seen.get(kind, 0))
    return errors


# -- prometheus-client's multiprocess mode: the store errors of every process of a host, added up --------

_counter_lock = threading.Lock()
#: The multiprocess-mode counter and this host's id, made at the first store error.
_counter: Optional[tuple[Any, str]] = None


def _count_in_multiprocess_mode(kind: str) -> None:
    """Count a store error in the multiprocess-mode counter (a file per process in ``PROMETHEUS_MULTIPROC_DIR``,
    added up over the host's processes by MultiProcessCollector), when that mode is on."""
    global _counter
    if not _multiprocess_dir():
        return
    with _counter_lock:
        if _counter is None:
            from prometheus_client import Counter

            from ..engine.owners import host_id

            _counter = (Counter("mpc_store_errors", "Store errors the serving processes of this host met "
                                "(StoreUnavailable: down or locked), added up over them.",
                                ["kind", "host"], registry=None), host_id())
        counter, host = _counter
    counter.labels(kind, host).inc()


store_error_hooks.append(_count_in_multiprocess_mode)
