"""The controller: a task queue in a store, and one controlling thread per child process.

Subclass it with the seed's keywords (``controller_name=``, ``logger=``,
``decorator=``), hand it a :class:`~.task.MetaMPTask` subclass and mount a
:class:`~.resource.MetaMPResource` with it. Creating a controller forks its fork
server at once (see :mod:`.forkserver` for why) and starts its controlling threads,
so queued tasks left by an earlier run start without waiting for a request. A
controller made with ``target_task=None`` starts neither: it only answers the HTTP
methods its class overrides.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
import types
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional, Sequence, Union, cast

from flask import current_app, has_app_context

from .http import compat as compat_module
from . import defaults
from . import artifacts as artifacts_module
from .http.arguments import ArgumentSpec, check_values
from .batches import Batch, BatchView, new_batch_id, parse_batch_id
from . import idempotency
from .idempotency import Submitted
from .submission import effective_timeout, new_rows
from .ops.console import console_aware
from .events import EventKind
from .settings import (
    FROZEN_SETTINGS, WorkerLogSetup, app_setting, check_arguments, check_pause_settings, env_shutdown_wait,
    max_pause_setting, runtime_config,
)
from .settings import env_progress_flush
from .exceptions import (
    BatchNotFound, ChangeNotAllowed, ControllerClosed, InvalidRequest, MethodNotServed, MPCError,
    NoTargetTask, PayloadTooLarge, TaskNotFound,
)
from .exceptions import TaskStillActive
from .engine.logs import MetaMPLoggerConfigurator
from .engine.exit import LIVE, exit_cleanly_on_sigterm
from .http import handlers
from .http.patching import check_priority
from .http.handlers import HTTP_METHODS, TASK_HANDLERS, parse_uuid
from .presenter import ListView, TaskObject, clip, hide_error_text, hide_traceback, present
from .engine.protocol import Limits
from .http.responses import Reply
from . import registry
from . import tracing
from .engine.clientside import ClientSide
from .engine.side import TaskSide
from .exceptions import StoreError
from .engine.forkserver import ForkServer
from .engine.handover import configured_window
from .engine.proctree import name_serving_process
from .engine.runtime import Runtime, task_fork_server
from .engine.schedules import ScheduleInfo, ScheduleSpec, describe
from .states import ALL_STATUSES, TERMINAL, TaskStatus
from .store import TaskStore, resolve_store, store_url
from .store.base import ANY_TENANT, SYSTEM_TENANT, Row, hook_tenant
from .store.base import Idempotency
from .waiting import QueueState, WaitLimits, read_queue_state
from .limits import (
    TenantUsage, check_fits_some_host, host_capacity, key_function, live_capacities, quota_spec,
    quota_usage, refuse_over_quota, stamp,
)
from .exceptions import IdempotencyKeyReused, IdempotentReplay, IdempotentTasksPurged
from .task import MetaMPTask


class MetaMPController:
    """Queues tasks in a store and runs them in child processes, ``max_num_process`` at a time.

    The positional order is upstream 0.1's: ``(target_task, callback_url,
    max_num_process, max_num_queue, logger_configurator_cls)``; the rest is keyword-only.

    :param target_task: the :class:`MetaMPTask` subclass to run, or None for a controller
        that runs no task and only answers the HTTP methods its class overrides (it starts
        no process and no thread).
    :param callback_url: an http(s) URL that receives a JSON POST when a task starts and
        when it ends. Anything but a string or None raises TypeError, so that a call written
        for 0.2's order, ``C(T, 2)``, fails instead of taking 2 for a URL.
    :param max_num_process: task processes of this controller alive at once, across every
        process that shares the store.
    :param max_num_queue: queued tasks allowed (running ones do not count); -1 = no bound.
    :param logger_configurator_cls: a :class:`MetaMPLoggerConfigurator` subclass (upstream's
        name of ``log_configurator``). Without one, the app's logging configuration decides
        where the controller's and the tasks' records go, and records at INFO and above
        that no handler takes are printed on standard error (see :mod:`.console`).
    :param timeout: seconds a task may run (None = no limit); a request may only lower it.
    :param stop_grace: seconds between a stop request and SIGTERM to the task's tree.
    :param max_memory: bytes of RSS a task's whole process tree may use (None = no limit).
    :param max_tasks_per_child: tasks one child process runs before it is replaced;
        1 (the default) gives each task a fresh process, 0 = reuse it without limit.
    :param store: a store URL (``sqlite:///path``, ``memory://``) or a :class:`TaskStore`;
        defaults to ``MPC_STORE_URL``, else ``sqlite:///mpc-tasks.sqlite3``.
    :param context: handed to each task as ``self.context``; never shown over HTTP.
    :param retention: seconds a finished task stays readable before it is purged.
    :param max_content_length: bytes a request body may hold.
    :param lease: seconds without a heartbeat after which a serving process on another
        host counts as dead and its running tasks are settled (``lost`` or requeued).
    :param log_configurator: the same as ``logger_configurator_cls``.
    :param max_wait: seconds a ``?wait=`` holds a request at most; a longer one is clamped.
    :param expose_tracebacks: show ``error.traceback`` to HTTP clients and callbacks (also
        shown over HTTP when the app runs in debug mode); the store and the logs always keep it.
    :param max_result_size: bytes of JSON a result may take; over it the task fails (``ResultTooLarge``).
    :param max_progress_size: bytes of JSON one progress value may take; a larger one is refused.
    :param max_state_size: bytes of JSON a task's ``save_state()`` value may take; over it the call raises
        :class:`~.exceptions.StateTooLarge` in the task (default 1 MiB).
    :param max_bulk: task objects one bulk POST may hold; over it, 413.
    :param max_message_size: bytes (UTF-8) of an exception's message that a task's ``error`` (and its
        ``msg``, and each entry of ``errors``) keeps; a longer one is clipped where it is recorded (4 KiB).
    :param expose_errors: show the text of a task's exception to HTTP clients and callbacks (the default);
        False shows only its type, with a sentence instead of its message (the store, the logs and the
        Python API keep the text). It hides the traceback too, whatever ``expose_tracebacks`` says.
    :param shutdown_wait: seconds a serving process that shuts down lets its running tasks finish on
        their own (claiming nothing meanwhile) before it stops them; None: the app's
        ``MPC_SHUTDOWN_WAIT``, else the ``MPC_SHUTDOWN_WAIT`` environment variable, else 0.
    :param idempotency_ttl: seconds a POST's ``Idempotency-Key`` is remembered with the tasks it made: the
        same key again within it answers with those tasks (200) and queues none (see :meth:`enqueue_once`).
    :param artifacts_url: where tasks keep the files they save (:mod:`.artifacts`): a directory (relative
        to the app's instance folder) or a ``file://`` URL, shared by every host that serves the app; None:
        ``MPC_ARTIFACTS_URL``, else ``<instance folder>/mpc-artifacts``.
    :param max_artifact_size: bytes one artifact may take (default 1 GiB); ``MPC_MAX_ARTIFACT_SIZE``.
    :param max_artifacts: artifacts one task may keep (default 100); ``MPC_MAX_ARTIFACTS``.
    :param callback_max_age: seconds a callback that could not be delivered stays in the store's outbox
        (retried at each start and reconciliation); then it is dropped, logged as a warning and counted in
        ``/mpc/health`` (``callbacks_dropped``). Default 7 days; ``MPC_CALLBACK_MAX_AGE`` in the app's config.
    :param concurrency_key: what makes tasks share a key that ``max_per_key`` bounds: the name of an argument
        of ``execute`` (its value is the key), or a callable ``concurrency_key(args, tenant) -> str`` (None: no
        key). Each task stores its key (``concurrency_key`` of the task object).
    :param max_per_key: running tasks of this controller with the same ``concurrency_key`` at most, across every
        process and host (None: no bound). Tasks of other keys behind a held one are not held up.
    :param max_per_tenant: running tasks of this controller of the same tenant at most (None: no bound).
    :param fair_share: whether claims go round-robin between the tenants with queued tasks (within a
        priority), so that a tenant with many queued tasks does not starve one with few (default True);
        False: strictly oldest first.
    :param tenant_quota: ``(cpu_seconds, window_seconds)``: the CPU time (of the tasks' process trees) each
        tenant's tasks may use per window; a tenant over it gets 429 with ``Retry-After`` at submit, and its
        queued tasks wait (``waiting_on: "quota"``) until enough usage leaves the window (None: no quota).
        The system's tasks (no request) are bounded by none. See ``<prefix>/api/usage``.
    :param compat: ``"0.1"`` makes this controller's resource take bodies of any content
        type and answer in upstream 0.1's shapes and codes, for clients that cannot change
        (see :mod:`.compat`); None (the default) keeps this version's answers.
    :param max_pause: seconds a task may stay paused (default one hour; None or 0: no limit); then the
        serving process that supervises it ends the pause as ``pause_expiry`` says. ``MPC_MAX_PAUSE``.
    :param pause_expiry: ``"resume"`` (the default) resumes a task paused for ``max_pause``; ``"stop"``
        stops it gracefully (it ends ``stopped``, error ``PauseExpired``). ``MPC_PAUSE_EXPIRY``.
    :param timeout_while_paused: whether ``timeout`` counts the time a task is paused (default True: a
        paused task holds its slot all along); False stops its clock while paused.
        ``MPC_TIMEOUT_WHILE_PAUSED``.
    :param can_change: a callable ``can_change(action, task) -> bool``, called in the request context (as
        ``tenant=``) before a request pauses (``"pause"``), resumes (``"resume"``), re-prioritises
        (``"priority"``), stops (``"stop"``, also once per task of a stop-all) or reruns (``"rerun"``) a task;
        ``task`` is its task object as the client would see it, plus its ``tenant``. Falsy: 403 (:class:`ChangeNotAllowed`),
        nothing changed. None (the default): whoever may reach the URL may change the task. The Python API
        and the CLI are not asked (no request).

    .. versionchanged:: 0.3
        Upstream's positional order; ``target_task=None``; ``logger_configurator_cls``;
        ``compat``, ``max_wait``, ``expose_tracebacks``, ``max_result_size``,
        ``max_progress_size``, ``max_bulk``, ``max_state_size``, ``max_message_size``, ``expose_errors``,
        ``max_pause``, ``pause_expiry``, ``timeout_while_paused``, ``can_change``.
    """

    _name: ClassVar[Optional[str]] = None
    _logger: ClassVar[logging.Logger] = logging.getLogger("MetaMPController")
    _decorator: ClassVar[Optional[Callable[[handlers.Handler], handlers.Handler]]] = None

    def __init_subclass__(cls, controller_name: Optional[str] = None, logger: Optional[logging.Logger] = None,
                          decorator: Optional[Callable[[handlers.Handler], handlers.Handler]] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if controller_name is not None:
            cls._name = controller_name
        elif "_name" not in cls.__dict__ and not cls.__dict__.get("_unnamed", False):
            cls._name = cls.__name__
        if logger is not None:
            cls._logger = logger
        elif "_logger" not in cls.__dict__:
            cls._logger = logging.getLogger(cls._name or cls.__name__)
        if decorator is not None:
            # staticmethod: a plain function stored on the class must not become a bound method.
            cls._decorator = staticmethod(decorator)

    def __init__(self, target_task: Optional[type[MetaMPTask]], callback_url: Optional[str] = None,
                 max_num_process: int = 1, max_num_queue: int = -1,
                 logger_configurator_cls: Optional[type[MetaMPLoggerConfigurator]] = None, *,
                 timeout: Optional[float] = None, stop_grace: float = defaults.STOP_GRACE,
                 max_memory: Optional[int] = None, max_tasks_per_child: int = 1,
                 store: Union[None, str, TaskStore] = None, context: Optional[Mapping[str, Any]] = None,
                 retention: float = defaults.RETENTION, max_content_length: int = defaults.MAX_CONTENT_LENGTH,
                 lease: float = defaults.LEASE, log_configurator: Optional[type[MetaMPLoggerConfigurator]] = None,
                 compat: Optional[str] = None, max_wait: float = defaults.MAX_WAIT,
                 expose_tracebacks: bool = False, max_result_size: int = defaults.MAX_RESULT_SIZE,
                 max_progress_size: int = defaults.MAX_PROGRESS_SIZE, max_bulk: int = defaults.MAX_BULK,
                 role: Optional[str] = None, tenant: Optional[Callable[[], Any]] = None,
                 max_state_size: int = defaults.MAX_STATE_SIZE,
                 max_message_size: int = defaults.MAX_MESSAGE_SIZE, expose_errors: bool = True,
                 handover_window: Optional[float] = None, shutdown_wait: Optional[float] = None,
                 idempotency_ttl: float = defaults.IDEMPOTENCY_TTL,
                 max_pause: Optional[float] = defaults.MAX_PAUSE, pause_expiry: str = defaults.PAUSE_EXPIRY,
                 timeout_while_paused: bool = True,
                 can_change: Optional[Callable[[str, dict[str, Any]], Any]] = None,
                 callback_max_age: float = defaults.CALLBACK_MAX_AGE, artifacts_url: Optional[str] = None,
                 max_artifact_size: int = defaults.MAX_ARTIFACT_SIZE,
                 max_artifacts: int = defaults.MAX_ARTIFACTS,
                 concurrency_key: Union[None, str, Callable[[dict[str, Any], Optional[str]], Any]] = None,
                 max_per_key: Optional[int] = None, max_per_tenant: Optional[int] = None, fair_share: bool = True,
                 tenant_quota: Optional[tuple[float, float]] = None) -> None:
        configurator = check_arguments(
            target_task, callback_url, max_num_process, max_num_queue, timeout, stop_grace, max_tasks_per_child,
            (logger_configurator_cls, log_configurator), role, tenant, max_wait=max_wait,
            max_result_size=max_result_size, max_progress_size=max_progress_size, max_bulk=max_bulk,
            max_state_size=max_state_size, max_message_size=max_message_size, idempotency_ttl=idempotency_ttl,
            callback_max_age=callback_max_age, max_artifact_size=max_artifact_size, max_artifacts=max_artifacts)
        check_pause_settings(max_pause, pause_expiry, timeout_while_paused, can_change)
        for name, bound in (("max_per_key", max_per_key), ("max_per_tenant", max_per_tenant)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
                raise ValueError(f"{name} must be a positive integer or None, not {bound!r}.")
        #: Running tasks per ``concurrency_key`` and per tenant at most (None: no bound); whether claims share
        #: out between tenants; each tenant's CPU quota (see :mod:`.limits`).
        self.max_per_key = max_per_key
        self.max_per_tenant = max_per_tenant
        self.fair_share = bool(fair_share)
        self.tenant_quota = quota_spec(tenant_quota)
        #: What one task needs of a host (its class's ``resources``, parsed), else None.
        self.resources: Optional[dict[str, float]] = (
            None if target_task is None else target_task.declared_resources)
        if max_memory is None and self.resources and "memory" in self.resources:
            max_memory = int(self.resources["memory"])  # what it declared is what it may use
        #: The task class this controller runs (None: it runs none).
        self.target_task = target_task
        self.max_num_process = max_num_process
        self.max_num_queue = max_num_queue
        self.callback_url = callback_url
        #: Seconds an undelivered callback is kept in the store's outbox; then it is dropped, logged and
        #: counted (``callbacks_dropped`` in ``/mpc/health``).
        self.callback_max_age = float(callback_max_age)
        #: Seconds between two writes of the running tasks' progress (``MPC_PROGRESS_FLUSH``, the app's or the
        #: environment's): every task of a serving process in one write.
        self.progress_flush: float = env_progress_flush()
        #: Where tasks keep their artifacts (a directory or ``file://`` URL; None: ``MPC_ARTIFACTS_URL``, else
        #: ``<instance folder>/mpc-artifacts``), the bytes one may take, and how many a task may keep.
        self.artifacts_url: Optional[str] = artifacts_url
        self.max_artifact_size = int(max_artifact_size)
        self.max_artifacts = int(max_artifacts)
        self.timeout = timeout
        self.stop_grace = float(stop_grace)
        self.max_memory = max_memory
        self.max_tasks_per_child = max_tasks_per_child
        self.context: dict[str, Any] = dict(context or {})
        self.retention = retention
        self.max_content_length = max_content_length
        self.max_wait = float(max_wait)
        #: Seconds the store keeps an ``Idempotency-Key`` with the tasks it made (see :mod:`.idempotency`).
        self.idempotency_ttl = float(idempotency_ttl)
        #: Seconds running tasks wait to be adopted when this process ends (None: ``MPC_HANDOVER_WINDOW``,
        #: else 60 s; 0: they are stopped with the process). See :mod:`.handover`.
        self.handover_window: Optional[float] = (
            None if handover_window is None else configured_window(handover_window))
        self.expose_tracebacks = bool(expose_tracebacks)
        #: Whether HTTP clients and callbacks see the text of a task's exception (else a sentence naming
        #: its type); the store, the logs and the Python API always keep it.
        self.expose_errors = bool(expose_errors)
        #: Bytes (UTF-8) of an exception's message a task's ``error`` keeps (the rest is clipped).
        self.max_message_size = int(max_message_size)
        self.max_bulk = int(max_bulk)
        self.lease = lease
        #: What queued tasks wait behind, and until when (``time.monotonic()``) it is kept (see :meth:`queue_state`).
        self._queue_state: Optional[tuple[float, QueueState]] = None
        #: Seconds a shutting-down serving process lets its running tasks finish (see ``shutdown_wait``).
        self.shutdown_wait = (env_shutdown_wait() if shutdown_wait is None
                              else app_setting("shutdown_wait", shutdown_wait))
        #: Controlling threads this process runs (None: ``max_num_process``); ``flask mpc worker --slots``
        #: sets it for the process. The store still holds ``max_num_process`` across processes.
        self.slots: Optional[int] = registry.slots()
        #: ``"0.1"`` when this controller answers HTTP in upstream 0.1's shapes (see :mod:`.compat`).
        self.compat: Optional[str] = compat_module.check_version(compat)
        #: The controller's name in the store: tasks are shared by controllers of the same name.
        self.name: str = self._name or (target_task or type(self)).__name__
        #: The class's logger; records at INFO and above that no handler takes go to standard error.
        self.logger = console_aware(self._logger)
        #: ``"client"``: this process submits, reads and stops tasks through the store but runs none.
        self.role: str = role or registry.role()
        #: Called in the request context: the tenant each task is stamped with and visible to.
        self.tenant = tenant
        #: Seconds a task may stay paused (None: no limit), what ends a longer pause, whether the timeout
        #: counts paused time (see :mod:`.engine.pausing`).
        self.max_pause: Optional[float] = max_pause_setting(max_pause)
        self.pause_expiry: str = pause_expiry
        self.timeout_while_paused: bool = timeout_while_paused
        #: Called in the request context before a request changes a task: may it? (see :meth:`check_change`).
        self.can_change = can_change
        self._store_arg = store
        self._store: Optional[TaskStore] = store if isinstance(store, TaskStore) else None
        #: Settings the app's ``MPC_*`` configuration may still set (those left at their defaults).
        self._configurable = {key for key, value, default in (
            ("stop_grace", stop_grace, defaults.STOP_GRACE), ("retention", retention, defaults.RETENTION),
            ("max_content_length", max_content_length, defaults.MAX_CONTENT_LENGTH),
            ("max_wait", max_wait, defaults.MAX_WAIT), ("expose_tracebacks", expose_tracebacks, False),
            ("handover_window", handover_window, None), ("shutdown_wait", shutdown_wait, None),
            ("max_message_size", max_message_size, defaults.MAX_MESSAGE_SIZE), ("expose_errors", expose_errors, True),
            ("idempotency_ttl", idempotency_ttl, defaults.IDEMPOTENCY_TTL),
            ("max_pause", max_pause, defaults.MAX_PAUSE),
            ("pause_expiry", pause_expiry, defaults.PAUSE_EXPIRY),
            ("timeout_while_paused", timeout_while_paused, True),
            ("callback_max_age", callback_max_age, defaults.CALLBACK_MAX_AGE),
            ("artifacts_url", artifacts_url, None),
            ("max_artifact_size", max_artifact_size, defaults.MAX_ARTIFACT_SIZE),
            ("max_artifacts", max_artifacts, defaults.MAX_ARTIFACTS),
            ("progress_flush", None, None),
        ) if value == default}
        self._app_config: Mapping[str, Any] = {}
        self._bound = False
        self._instance_path: Optional[str] = None
        self._spec = ArgumentSpec(target_task.execute) if target_task is not None else None
        self._key_function = (None if self._spec is None else key_function(
            concurrency_key, self._spec.names, self._spec.open,
            {p.name: p.default for p in self._spec.params if p.has_default}))
        if concurrency_key is not None and self._spec is None:
            raise ValueError("concurrency_key needs a target_task.")
        #: What the submit checks read of the store (hosts' capacities, quota usage), and until when it is kept.
        self._limits_read: dict[str, tuple[float, Any]] = {}
        self._handlers: dict[str, Callable[..., Any]] = {}
        #: The schedules declared in this process, by name.
        self._schedules: dict[str, ScheduleSpec] = {}
        self._configurator = configurator or WorkerLogSetup
        self.posts = compat_module.PostCounter()
        self._limits = Limits(result_bytes=int(max_result_size), progress_bytes=int(max_progress_size),
                              state_bytes=int(max_state_size), message_bytes=self.max_message_size)
        # Guards _store and _side creation, and _closed.
        self._lock = threading.RLock()
        self._closed = False
        self._side: Optional[TaskSide] = None
        self._fork_server: Optional[ForkServer] = None
        registry.register(self)
        if target_task is None:
            return  # nothing to run: no fork server, no thread, nothing to shut down at exit
        if self.role == registry.SERVER:
            if self._configurator is not WorkerLogSetup:
                self._configurator.listener_log_setup()
            # Forked now, while the process may still be single-threaded (see forkserver.py); the rest
            # of the runtime starts once the store is known (see bind() and _activate()).
            self._fork_server = task_fork_server(target_task, self._configurator, max_tasks_per_child)
            self._fork_server_pid_owner = os.getpid()
            exit_cleanly_on_sigterm()
        LIVE.add(self)
        if isinstance(store, TaskStore):
            self._activate()  # a store object is final: nothing the app says can change it

    # -- life cycle ---------------------------------------------------------------

    def bind(self, config: Mapping[str, Any], instance_path: Optional[str] = None) -> None:
        """Take an app's ``MPC_*`` settings and instance folder (what :class:`MultiprocessController` does).

        Settings given to the constructor win over the app's; relative SQLite paths resolve
        against ``instance_path``. The first app to bind a controller is its app. Nothing runs against a store before the controller is
        bound, mounted or used, so a controller made at import time never touches a store
        that the app's configuration names differently.

        :raises RuntimeError: the controller already uses another store than the app names.
        """
        with self._lock:
            if self._bound:  # the first app to bind a controller is its app
                return
            settings = {key: app_setting(key, config["MPC_" + key.upper()]) for key in self._configurable
                        if "MPC_" + key.upper() in config}
            if self._side is not None:
                self._check_unchanged(settings, config)
            self._bound = True
            self._app_config = dict(config)
            self._instance_path = instance_path
            for key, value in settings.items():
                setattr(self, key, value)
            self._limits = dataclasses.replace(self._limits, message_bytes=self.max_message_size)

    def _check_unchanged(self, settings: dict[str, Any], config: Mapping[str, Any]) -> None:
        """A controller that already runs cannot take another store, stop grace or retention: say how to
        order the set-up (the settings read at each request it takes as they come)."""
        changed = sorted(key for key, value in settings.items()
                         if key in FROZEN_SETTINGS and getattr(self, key) != value)
        if self._store_arg is None and store_url(config.get("MPC_STORE_URL")) != self._store_url_used:
            changed.insert(0, "store")
        if changed:
            raise RuntimeError(
                f"Controller {self.name} started before the app's configuration was read, so it cannot take the "
                f"app's {', '.join(changed)}: make the MultiprocessController() before mounting resources (and "
                f"call init_app(app) once they are), or give the controller these settings itself.")

    @property
    def store(self) -> TaskStore:
        """The task store: the constructor's ``store=``, else the app's ``MPC_STORE_URL``, else the
        ``MPC_STORE_URL`` environment variable, else the default SQLite file."""
        with self._lock:
            if self._store is None:
                url = self._store_arg if isinstance(self._store_arg, str) else None
                url = url or self._app_config.get("MPC_STORE_URL")
                self._store_url_used = store_url(url)
                store = resolve_store(self._store_url_used, self._instance_path)
                if self.role == registry.CLIENT and not store.shared:
                    raise StoreError(f"Controller {self.name} is a client ({registry.ROLE_ENV}=client) and its store "
                                     f"{self._store_url_used} lives in one process only: name a shared store "
                                     f"(sqlite:///... or redis://...).")
                self._store = store
            return self._store

    def mounted(self) -> None:
        """The controller's resource was mounted in an app: start it, unless an extension will (its init_app)."""
        if not registry.extension_made() and self.target_task is not None:
            self._activate()

    def start_serving(self) -> None:
        """Start running tasks now (the extension's ``init_app`` in a server process), not at the first use.

        A client runs nothing, so it waits for its first use; a store that cannot be reached (or named) now is
        logged, and the controller starts at its first use instead, as it would without this: the app still
        starts, and answers 503 until the store is back.
        """
        if self.target_task is None or self._closed or self.role == registry.CLIENT:
            return
        try:
            self._activate()
        except StoreError as exc:
            self.logger.warning("Controller %s starts at its first use: its store is not usable now: %s",
                                self.name, exc)

    def _activate(self) -> TaskSide:
        with self._lock:
            if self._closed:
                raise ControllerClosed(f"Controller {self.name} has been shut down.")
            side = self._side
            if side is not None and side.pid == os.getpid():
                return side
            if self.target_task is None:
                raise NoTargetTask(f"Controller {self.name} has no target_task, so it runs no tasks.",
                                   self.served_methods())
            self._bind_to_current_app()
            store = self.store
            if self.role == registry.CLIENT:
                self._side = ClientSide(store, self.name, self.logger)
                return self._side
            fork_server = self._fork_server
            if fork_server is None or self._fork_server_pid_owner != os.getpid():
                # A forked copy of the controller (gunicorn --preload) gets a fork server of its own.
                fork_server = self._fork_server = task_fork_server(
                    self.target_task, self._configurator, self.max_tasks_per_child)
                self._fork_server_pid_owner = os.getpid()
            runtime = Runtime(runtime_config(self), store, self.callback_url, fork_server)
            if self.resources is not None:  # else claims need not count resources: the plain claim stays
                runtime.capacity = host_capacity()
            self._side = runtime
            runtime.start()
            name_serving_process(current_app.name if has_app_context() else None)  # what ps shows
            for spec in self._schedules.values():
                runtime.declare_schedule(spec)
            return runtime

    def _bind_to_current_app(self) -> None:
        """Used first inside an app that has the extension (a request, a CLI command): take its settings."""
        if not self._bound and has_app_context() and "mpc" in current_app.extensions:
            self.bind(current_app.extensions["mpc"].settings, current_app.instance_path)

    @property
    def log_configurator(self) -> type[MetaMPLoggerConfigurator]:
        """The log configurator of this controller's task processes."""
        return self._configurator

    @property
    def limits(self) -> Limits:
        """The sizes a task's reports may have, and where and how many artifacts it may keep."""
        return dataclasses.replace(self._limits, artifact_bytes=self.max_artifact_size,
                                   artifact_count=self.max_artifacts, artifacts_url=self.artifacts_directory)

    @property
    def artifacts_directory(self) -> str:
        """The directory of this controller's artifacts: a folder named after it under ``artifacts_url``
        (see :mod:`.artifacts`)."""
        return artifacts_module.controller_folder(
            artifacts_module.storage_root(self.artifacts_url, self._instance_path), self.name)

    def context_view(self) -> Mapping[str, Any]:
        """A read-only view of the context handed to every task."""
        return types.MappingProxyType(self.context)

    @property
    def runtime(self) -> Runtime:
        """The runtime of this serving process, started on first use (a forked copy gets its own).

        :raises RuntimeError: in a client-only process, which has no runtime.
        """
        side = self._activate()
        if not isinstance(side, Runtime):
            raise RuntimeError(f"Controller {self.name} is a client in this process: it runs no tasks here.")
        return side

    def local_runtime(self) -> Optional[Runtime]:
        """The runtime this process started for the controller, if any (never starts one)."""
        with self._lock:
            side = self._side
        return side if isinstance(side, Runtime) and side.pid == os.getpid() else None

    @property
    def forkserver_pid(self) -> Optional[int]:
        """Pid of the fork server whose children are this controller's task processes."""
        return self._fork_server.pid if self._fork_server is not None else None

    def shutdown(self, timeout: Optional[float] = None, hand_over: bool = False) -> None:
        """Stop taking tasks, stop running ones (``stop_grace``, then kill) and release every resource.

        Queued tasks stay queued in the store for the next start.

        :param hand_over: leave the running tasks running, for another serving process of the app on
            this host to adopt within ``handover_window`` seconds (what the end of a serving process
            does; see :mod:`.handover`); without a window, or with a store of one process, they are
            stopped all the same.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            side, self._side = self._side, None
            fork_server, self._fork_server = self._fork_server, None
            store = self._store
        handed_over = False
        if side is not None and side.pid == os.getpid():
            handed_over = side.shutdown(timeout, hand_over)
        if fork_server is not None and self._fork_server_pid_owner == os.getpid():
            fork_server.close(hand_over=handed_over)
        if store is not None:
            store.close()
        LIVE.discard(self)
        registry.unregister(self)

    def __enter__(self) -> "MetaMPController":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- Python API ---------------------------------------------------------------

    def enqueue(self, items: Sequence[Mapping[str, Any]], *, priority: int = 0,
                timeout: Optional[float] = None, batch: Optional[str] = None,
                tenant: Optional[str] = None, connection: Any = None,
                traceparent: Optional[str] = None) -> list[TaskObject]:
        """Queue one task per mapping of keyword arguments, all or none; return their task objects.

        A ``priority`` key in a mapping is taken as that task's priority unless
        ``execute`` has a parameter of that name (seed compatibility). ``batch`` is stored
        with every task (see :meth:`submit_many`). ``tenant`` stamps the tasks with that tenant;
        None (the default) stamps them with the request's (see :meth:`task_tenant`).
        :raises InvalidArguments: an item does not fit ``execute``; nothing is queued.
        :raises QueueFull: the items do not fit in the queue; nothing is queued.
        :raises TypeError: ``tenant`` is not a string.

        ``connection``: the application's open database connection or session; the tasks are then written in
        its transaction (see :meth:`submit`).

        ``traceparent``: the W3C trace context the tasks belong to; by default the current OpenTelemetry
        span's (with ``opentelemetry-api`` installed), else the ``traceparent`` header of the request being
        served (see :mod:`.tracing`). An invalid one is ignored.

        .. versionchanged:: 0.3
            ``tenant``, ``connection``, ``traceparent``.
        """
        return self._present_new(self.enqueue_rows(items, priority, timeout, batch, tenant, connection=connection,
                                                   traceparent=traceparent))

    def enqueue_rows(self, items: Sequence[Mapping[str, Any]], priority: int, timeout: Optional[float],
                     batch: Optional[str], tenant: Optional[str] = None,
                     keyed: Optional[Callable[[list[Row]], Idempotency]] = None,
                     connection: Any = None, traceparent: Optional[str] = None) -> list[Row]:
        """:meth:`enqueue` without the task objects (a caller that waits reads them anyway).

        :param keyed: makes the store's record of the submission's key from its rows (see
            :meth:`enqueue_once`, which passes it); the store may then raise :class:`IdempotentReplay`.
        :param connection: the application's connection or session whose open transaction the rows are
            written in (a store with ``enqueue_in``: PostgreSQL); its commit makes them visible and wakes
            the slots of every serving process.
        :param traceparent: the W3C trace context to keep with the tasks (see :func:`.tracing.incoming`,
            which also reads the request's header and the current OpenTelemetry span).
        """
        side = self._activate()  # raises NoTargetTask for a controller without a task
        spec = self._spec
        if spec is None:
            raise NoTargetTask(f"Controller {self.name} has no target_task, so it runs no tasks.",
                               self.served_methods())
        if len(items) > self.max_bulk:
            raise PayloadTooLarge(f"{len(items)} tasks in one request; the limit is {self.max_bulk}.")
        rows = new_rows(spec, self.name, items, priority, self._effective_timeout(timeout), self.task_tenant(tenant),
                        batch)
        self._admit(rows)
        with tracing.submission(self.name, traceparent) as traced:
            for row in rows:
                row["traceparent"] = traced.traceparent
            traced.tasks([row["uuid"] for row in rows], batch)
            if connection is not None:
                enqueue_in = getattr(self.store, "enqueue_in", None)
                if enqueue_in is None:
                    raise TypeError(f"connection= writes tasks in the application's own transaction, which needs "
                                    f"the PostgreSQL store (MPC_STORE_URL=postgresql://...); this controller's store "
                                    f"is {type(self.store).__name__}.")
                enqueue_in(connection, rows, self.max_num_queue, keyed(rows) if keyed is not None else None)
            elif keyed is None:
                side.submit(rows, self.max_num_queue)
            else:
                side.submit(rows, self.max_num_queue, keyed(rows))
        return rows

    def enqueue_once(self, key: str, items: Sequence[Mapping[str, Any]], *, priority: int = 0,
                     timeout: Optional[float] = None, bulk: bool = False) -> Submitted:
        """Queue one task per mapping of keyword arguments, all or none, unless ``key`` was used already.

        What a POST with an ``Idempotency-Key`` does, and ``flask mpc submit``: the store records ``key``
        (scoped to this controller and the request's tenant) with the tasks, in the same atomic step as
        their insert, for :attr:`idempotency_ttl` seconds. Within that time the same key with the same
        items and options returns the tasks it made, with ``replayed`` True, and queues nothing (even
        when the queue is full); so a caller whose answer was lost may simply ask again. ``bulk`` makes
        the tasks one batch (as :meth:`submit_many`).

        :raises InvalidRequest: ``key`` is not 1 to 255 printable ASCII characters.
        :raises IdempotencyKeyReused: the key was used with other items or options (nothing is queued).
        :raises IdempotentTasksPurged: the key's tasks have been purged since.

        .. versionadded:: 0.3
        """
        key = idempotency.check_key(key)
        if bulk and not items:
            raise InvalidRequest("A batch needs at least one task.")
        fingerprint = idempotency.fingerprint(items, bulk, priority, timeout)

        def record(rows: list[Row]) -> Idempotency:
            scoped = idempotency.scoped_key(self.name, rows[0].get("tenant") if rows else None, key)
            return Idempotency(scoped, fingerprint, self.idempotency_ttl)

        try:
            rows = self.enqueue_rows(items, priority, timeout, new_batch_id() if bulk else None, keyed=record)
        except IdempotentReplay as replay:
            if replay.fingerprint != fingerprint:
                raise IdempotencyKeyReused(
                    f"The {idempotency.HEADER} {key[:80]!r} was used with other arguments or options: send a new "
                    f"key for a new submission.") from None
            found = [self.store.get(uuid) for uuid in replay.uuids]
            rows = [row for row in found if row is not None and row["controller"] == self.name]
            if not rows:
                raise IdempotentTasksPurged(
                    f"The tasks made with the {idempotency.HEADER} {key[:80]!r} ({', '.join(replay.uuids)}) have "
                    f"been purged: send a new key to submit again.") from None
            return Submitted(rows, True)
        return Submitted(rows, False)

    def submitted_tasks(self, submitted: Submitted) -> list[TaskObject]:
        """The task objects of what :meth:`enqueue_once` returned (those it queued now, or those it found).

        .. versionadded:: 0.3
        """
        if submitted.replayed:
            return [self._present(row) for row in submitted.rows]
        return self._present_new(submitted.rows)

    def submit(self, **kwargs: Any) -> str:
        """Queue ``execute(**kwargs)`` and return the task's uuid.

        Outside a request the task is the system's (:data:`SYSTEM_TENANT`); ``enqueue([kwargs], tenant=...)``
        queues one for a tenant (every keyword here is an argument of ``execute``).

        ``connection=`` (unless ``execute`` has a parameter of that name) is the application's open
        database connection or session on the PostgreSQL store's database: a psycopg 3 or psycopg2
        connection, a SQLAlchemy ``Connection`` or ``Session`` (Flask-SQLAlchemy's ``db.session``). The
        task and its ``queued`` event are then written in that transaction: the task exists if and only
        if the transaction commits, is seen by no slot or reader before, and runs once it has.

        The task belongs to the trace of the current OpenTelemetry span (with ``opentelemetry-api``
        installed), else of the request's ``traceparent`` header; ``enqueue([kwargs], traceparent=...)``
        names one.

        .. versionchanged:: 0.3
            ``connection``.
        """
        connection = None
        if "connection" in kwargs and (self._spec is None or "connection" not in self._spec.names):
            connection = kwargs.pop("connection")
        # Only the uuid is returned: no task object, so no queue position to count.
        return str(self.enqueue_rows([kwargs], 0, None, None, connection=connection)[0]["uuid"])

    def submit_many(self, items: Sequence[Mapping[str, Any]], *, priority: int = 0,
                    timeout: Optional[float] = None, tenant: Optional[str] = None, connection: Any = None,
                    traceparent: Optional[str] = None) -> Batch:
        """Queue one task per mapping of keyword arguments, all or none, as one batch.

        Returns the :class:`~.batches.Batch`: its ``id`` (what :meth:`wait_batch` and
        ``GET <collection>?batch=`` take) and the task objects, in input order. ``tenant``: as
        :meth:`enqueue`. ``connection``: the application's transaction to write them in (see :meth:`submit`).
        ``traceparent``: the trace they belong to (see :meth:`enqueue`).

        .. versionadded:: 0.3
        """
        if not items:
            raise InvalidRequest("A batch needs at least one task.")
        batch = new_batch_id()
        return Batch(batch, self.enqueue(items, priority=priority, timeout=timeout, batch=batch, tenant=tenant,
                                         connection=connection, traceparent=traceparent))

    def wait_batch(self, batch: str, timeout: Optional[float] = None) -> BatchView:
        """Wait until every task of the batch has ended, or ``timeout`` seconds passed (0: do not wait).

        Returns ``{"batch", "total", "ended", "tasks"}``, the tasks in input order. The wait
        is woken by the last task's ``ended`` event, wherever it ran: the batch is read again
        only then (and when events were lost), not at each task's end.

        :raises BatchNotFound: no task of this controller (visible to the request) has this id.
        :raises InvalidRequest: ``batch`` is not a batch id.

        .. versionadded:: 0.3
        """
        batch = parse_batch_id(batch)
        side = self._activate()
        deadline = None if timeout is None else time.monotonic() + timeout
        rows = self._batch_rows(batch)
        if timeout is not None and timeout <= 0 or all(row["status"] in TERMINAL for row in rows):
            return self._batch_view(batch, rows)
        with side.watch_all([row["uuid"] for row in rows]) as countdown:
            while True:
                rows = self._batch_rows(batch)  # read after watching: no ending is missed
                pending = [row["uuid"] for row in rows if row["status"] not in TERMINAL]
                remaining = None if deadline is None else deadline - time.monotonic()
                if not pending or side.closing or (remaining is not None and remaining <= 0):
                    return self._batch_view(batch, rows)
                countdown.still_pending(pending)
                countdown.done.wait(remaining)
                countdown.done.clear()

    def _batch_view(self, batch: str, rows: list[Row]) -> BatchView:
        tasks = [self._present(row) for row in rows]
        ended = sum(task["status"] in TERMINAL for task in tasks)
        return {"batch": batch, "total": len(tasks), "ended": ended, "tasks": tasks}

    def _batch_rows(self, batch: str) -> list[Row]:
        self._started()
        rows = [row for row in self.store.batch(self.name, batch) if self.visible(row)]
        if not rows:
            raise BatchNotFound(batch)
        return rows

    def status(self, uuid: str) -> TaskObject:
        """Return the task object of a task of this controller (with its ``reruns``).

        :raises TaskNotFound: no such task here.
        """
        return self._present_item(self._row(uuid))

    def rerun(self, uuid: str) -> TaskObject:
        """Queue an ended task again; return the new task's object.

        The new task runs the same ``execute`` arguments with the same priority and timeout (the
        controller's ``timeout`` still caps it) and belongs to the same tenant; it is not part of the
        first one's batch or schedule. Its ``rerun_of`` names the first task, whose ``reruns`` then name it.
        Any ended task may be run again: ``failed``, ``stopped``, ``timed_out``, ``lost``, and ``succeeded``
        too (a report to make again). In a request, the ``can_change`` hook is asked first (``"rerun"``).

        :raises TaskNotFound: no such task here (or not the request's tenant's).
        :raises TaskStillActive: the task has not ended (409).
        :raises ChangeNotAllowed: the ``can_change`` hook refused the request.
        :raises InvalidArguments: ``execute``'s signature no longer takes the task's arguments.
        :raises QueueFull: the controller's queue is full.

        .. versionadded:: 0.3
        """
        row = self._row(uuid)
        if row["status"] not in TERMINAL:
            raise TaskStillActive(row["uuid"], row["status"])
        self.check_change("rerun", row)
        side = self._activate()  # raises NoTargetTask for a controller without a task
        spec = cast(ArgumentSpec, self._spec)  # a controller with a task has its spec
        rows = new_rows(spec, self.name, [row["args"]], row["priority"], self._effective_timeout(row.get("timeout")),
                        row.get("tenant"), None)
        rows[0]["rerun_of"] = row["uuid"]
        self._admit(rows)
        with tracing.submission(self.name) as traced:  # a new submission: in the trace of the request asking it
            rows[0]["traceparent"] = traced.traceparent
            traced.tasks([rows[0]["uuid"]], None)
            side.submit(rows, self.max_num_queue)
        task = self._present_new(rows)[0]
        task["reruns"] = []
        return task

    def share_url(self, uuid: str, ttl: float = defaults.SHARE_TTL) -> str:
        """A signed, read-only link to task ``uuid`` that expires in ``ttl`` seconds (1 s to 30 days).

        The link shows that task only (status, progress, result, error, files) as JSON, as Server-Sent
        Events and, to a browser, as a small live page; anyone who has it may read the task until it
        expires, without the app's ``decorator=`` or ``tenant=`` hook (see :mod:`.http.share`). It is
        signed with the app's ``SECRET_KEY``: call it in a request (the link is then absolute) or within
        ``app.app_context()`` (absolute with ``SERVER_NAME``, else the path from the app's root).

        :raises TaskNotFound: no such task here (or not the request's tenant's).
        :raises InvalidRequest: ``ttl`` is out of bounds.
        :raises ShareLinksUnavailable: the app has no ``SECRET_KEY``, no app context, or no extension.

        .. versionadded:: 0.3
        """
        from .http.share import share_url

        return share_url(self, uuid, ttl)

    def stop(self, uuid: str, *, finish: bool = False) -> TaskObject:
        """Ask a task to stop; return its task object (``stopped`` if it was queued, else ``stopping``).

        With ``finish``, a running (or paused) task is asked to *finish now* instead: inside ``execute``,
        :attr:`~.task.MetaMPTask.finishing` turns true and ``checkpoint()`` raises
        :class:`~.exceptions.FinishRequested`; a task that returns then ends ``stopped`` with that
        ``result`` and ``stopped_with_result: true``. One that ignores it stops as for a plain stop, and
        ``stop_grace`` applies alike. A queued task has no answer yet: it is stopped as without ``finish``.
        A finish is a stop to the ``can_change`` hook (asked with ``"stop"``).

        :raises TaskNotFound: no such task here.
        :raises TaskAlreadyFinished: the task has already ended.
        :raises ChangeNotAllowed: the ``can_change`` hook refused the request.

        .. versionchanged:: 0.3
            ``finish``.
        """
        self.check_change("stop", self._row(uuid))
        return self._present(self._activate().stop(uuid, finish=finish))

    def wait(self, uuid: str, timeout: Optional[float] = None) -> TaskObject:
        """Wait until the task has ended or ``timeout`` seconds passed; return its task object."""
        side = self._activate()
        deadline = None if timeout is None else time.monotonic() + timeout
        # The task's 'ended' event wakes us, whichever process or host ran it: no polling. It
        # carries the task as its ending wrote it but its arguments, which never change: merged into
        # the row read first, the store is not read again then.
        with side.watch(uuid) as ended:
            row = self._row(uuid)
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if row["status"] in TERMINAL or side.closing or (remaining is not None and remaining <= 0):
                    return self._present_item(row)
                ended.wait(remaining)
                ended.clear()
                task = cast(Optional[Row], ended.task)
                row = (cast(Row, {**row, **task}) if task is not None and task.get("status") in TERMINAL
                       else self._row(uuid))

    def tasks(self, status: Union[None, str, Iterable[str]] = None, limit: int = defaults.LIST_LIMIT) -> ListView:
        """Return the list view: ``{"tasks": [...], "running": n, "queued": m, "max_num_process": k}``.

        In a request of a controller with a ``tenant=`` hook, the tasks and the counts are the tenant's.
        """
        statuses = [status] if isinstance(status, str) else list(status or [])
        unknown = [s for s in statuses if s not in ALL_STATUSES]
        if unknown:
            raise InvalidRequest(f"Unknown status {unknown[0]!r}: use one of {', '.join(ALL_STATUSES)}.")
        if not 1 <= limit <= defaults.MAX_LIST_LIMIT:
            raise InvalidRequest(f"'limit' must be between 1 and {defaults.MAX_LIST_LIMIT}.")
        self._started()
        tenant = self.tenant_filter()
        rows = self.store.list_tasks(self.name, statuses or None, limit, tenant=tenant)
        counts = self.store.counts(self.name, tenant=tenant)
        queue = (self.queue_state(counts if tenant is ANY_TENANT else None)
                 if any(row["status"] == TaskStatus.QUEUED for row in rows) else None)
        return {
            "tasks": [clip(self._present(row, queue), defaults.LIST_VALUE_SIZE) for row in rows],
            "running": counts.get("running", 0) + counts.get("stopping", 0) + counts.get("paused", 0),
            "queued": counts.get("queued", 0),
            "max_num_process": self.max_num_process,
        }

    # -- task policies (see retries.py, pausing.py, schedules.py) ---------------------

    def pause(self, uuid: str) -> TaskObject:
        """Suspend a running task's whole process tree, wherever it runs; return its task object (``paused``).

        It keeps its slot, and its timeout goes on counting (unless ``timeout_while_paused=False``) until
        :meth:`resume`, or until ``max_pause`` ends the pause. Pausing a paused task changes nothing.

        :raises TaskNotFound: no such task here.
        :raises TaskAlreadyFinished: the task has already ended.
        :raises InvalidTransition: the task is queued or stopping.
        :raises ChangeNotAllowed: the ``can_change`` hook refused the request.

        .. versionadded:: 0.3
        """
        return self._change(uuid, "pause", lambda side, u: side.pause(u))

    def resume(self, uuid: str) -> TaskObject:
        """Resume a paused task; return its task object (``running``). Resuming a running task changes nothing.

        :raises TaskNotFound, TaskAlreadyFinished, InvalidTransition: as :meth:`pause`.

        .. versionadded:: 0.3
        """
        return self._change(uuid, "resume", lambda side, u: side.resume(u))

    def reprioritise(self, uuid: str, priority: int) -> TaskObject:
        """Give a queued task a new priority (lower runs first); its ``position`` follows at once.

        :raises InvalidRequest: ``priority`` is not an integer in range.
        :raises InvalidTransition: the task is no longer queued (409).

        .. versionadded:: 0.3
        """
        priority = check_priority(priority)
        return self._change(uuid, "priority", lambda side, u: side.reprioritise(u, priority))

    def stop_all(self) -> dict[str, int]:
        """Stop every queued, running and paused task of this controller, wherever it runs.

        Queued tasks end ``stopped`` without starting (in one atomic step of the store, so none
        starts meanwhile); running and paused ones get the usual graceful stop and escalation.
        In a request of a controller with a ``tenant=`` hook, only the tenant's tasks (read from
        the store's tenant index: the cost follows them, not the controller's other tasks).
        Returns ``{"stopped": <queued tasks stopped>, "stopping": <running tasks asked to stop>}``.
        With a ``can_change`` hook, in a request, every task is put to it first, and one refusal stops none
        (:class:`ChangeNotAllowed`).

        .. versionadded:: 0.3
        """
        side = self._activate()
        if self.can_change is not None and handlers.in_request():
            return self._stop_all_checked(side)
        events = side.stop_all(self.name, tenant=self.tenant_filter())
        return {"stopped": sum(e["kind"] == EventKind.ENDED for e in events),
                "stopping": sum(e["kind"] == EventKind.STOPPING for e in events)}

    def _stop_all_checked(self, side: TaskSide) -> dict[str, int]:
        """Stop-all under a ``can_change`` hook: all or nothing. Every task it would stop (the request's
        tenant's) is put to the hook first; if it refuses any, nothing is stopped (403). Tasks queued
        after the check are not stopped."""
        uuids: list[str] = []
        refused = 0
        before = None
        while True:
            rows = self.store.list_tasks(self.name, ["queued", "running", "paused"], defaults.MAX_LIST_LIMIT,
                                         before, tenant=self.tenant_filter())
            for row in rows:
                if self._may_change("stop", row):
                    uuids.append(row["uuid"])
                else:
                    refused += 1
            if len(rows) < defaults.MAX_LIST_LIMIT:
                break
            before = rows[-1]["seq"]
        if refused:
            raise ChangeNotAllowed(None, "stop", f"This request may not stop {refused} of the "
                                                 f"{refused + len(uuids)} tasks of controller {self.name} "
                                                 f"that stop-all would stop; none was stopped.")
        counts = {"stopped": 0, "stopping": 0}
        for uuid in uuids:
            try:
                row = side.stop(uuid)
            except MPCError:  # it ended meanwhile
                continue
            counts["stopped" if row["status"] == TaskStatus.STOPPED else "stopping"] += 1
        return counts

    def schedule(self, name: str, *, cron: Optional[str] = None, every: Optional[float] = None,
                 kwargs: Optional[Mapping[str, Any]] = None, tz: str = "UTC", catchup: str = "skip",
                 priority: int = 0, timeout: Optional[float] = None, tenant: Optional[str] = None) -> None:
        """Queue ``execute(**kwargs)`` at each firing of a schedule, once across every process sharing the store.

        Give ``cron`` (a cron expression in time zone ``tz``; needs the ``schedules`` extra) or
        ``every`` (seconds, at least 1). Declare it in every serving process, after the
        controller is made (at import time, as the controller itself); declaring a name again
        replaces it. ``catchup`` says what happens to firings missed while no server ran:
        ``"skip"`` them, or queue ``"one"`` task for them. ``tenant`` names the tenant its tasks
        belong to (and who, besides operators, sees the schedule); None: the system's
        (:data:`SYSTEM_TENANT`). See :mod:`.schedules`.

        :raises InvalidArguments: ``kwargs`` do not fit ``execute``.
        :raises ValueError, TypeError: a bad schedule (the message says which field).

        .. versionadded:: 0.3
        """
        if self._spec is None:
            raise NoTargetTask(f"Controller {self.name} has no target_task: it has nothing to schedule.",
                               self.served_methods())
        spec = ScheduleSpec.build(name, cron=cron, every=every, tz=tz, kwargs=kwargs, catchup=catchup,
                                  priority=check_priority(priority), timeout=self._effective_timeout(timeout),
                                  tenant=tenant)
        check_values(spec.kwargs, defaults.MAX_ARGS_DEPTH)
        self._spec.check(spec.kwargs)
        self._schedules[name] = spec
        with self._lock:
            side = None if self._closed else self._side
        if side is not None and side.pid == os.getpid():  # else the runtime made next declares it
            side.declare_schedule(spec)

    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule of this controller: declared by a serving process now (``active``), in the past
        (inactive), or only in this process; with its next firing, its last one and its skipped firings.

        Reads the store only: it works in any process, serving or not. In a request of a controller
        with a ``tenant=`` hook, only the schedules of the request's tenant (the system's, those
        naming no tenant, only when the hook answers :data:`ALL_TENANTS`).

        .. versionadded:: 0.3
        """
        self._started()
        return describe(self.store.schedules(self.name), self._schedules, self.name, self.store.now(), self.lease,
                        self.tenant_filter())

    def _change(self, uuid: str, name: str, action: Callable[[TaskSide, str], Row]) -> TaskObject:
        """Apply an action of this process's side to one task of this controller, if the request may make
        change ``name`` (see :meth:`check_change`); its task object after."""
        row = self._row(uuid)
        self.check_change(name, row)
        return self._present(action(self._activate(), row["uuid"]))

    def check_change(self, action: str, row: Row) -> None:
        """Ask the ``can_change`` hook whether the request being served may make change ``action`` to ``row``.

        :param action: ``"pause"``, ``"resume"``, ``"priority"``, ``"stop"`` or ``"rerun"``.
        :raises ChangeNotAllowed: the hook answered falsy (403).

        .. versionadded:: 0.3
        """
        if not self._may_change(action, row):
            raise ChangeNotAllowed(row["uuid"], action)

    def _may_change(self, action: str, row: Row) -> bool:
        """The hook's answer (True without a hook, or outside a request: the Python API and the CLI)."""
        if self.can_change is None or not handlers.in_request():
            return True
        task: dict[str, Any] = dict(self.client_view(row))
        task["tenant"] = row.get("tenant")
        return bool(self.can_change(action, task))

    # -- HTTP methods (what MetaMPResource calls; override them as in the seed) ---------
    #
    # Each one gets the request's JSON body and path values as keywords and returns a
    # Reply: a dict that carries its status and headers, which an override calling
    # super() may change. A method the controller does not serve raises MethodNotServed
    # (405 with Allow); overriding it in a subclass serves it.

    def post(self, *args: Mapping[str, Any], **kwargs: Any) -> Reply:
        """Queue a task (keyword arguments) or several (positional mappings, all or none).

        Answers 202 with the task object and a ``Location`` header, or ``{"tasks": [...]}``
        for several; 200 with ``?wait=`` once every task ended within the wait.
        """
        return handlers.post(self, *args, **kwargs)

    def get(self, **kwargs: Any) -> Reply:
        """Return one task (when a ``uuid`` is given) or the list view; other keywords are ignored."""
        return handlers.get(self, **kwargs)

    def delete(self, **kwargs: Any) -> Reply:
        """Stop task ``uuid``: 202 while it stops, 200 when it was queued and is now stopped.

        Without a uuid, ``?all=true`` stops every queued and running task of the controller:
        202 with ``{"stopped": n_queued, "stopping": n_running}`` (see :meth:`stop_all`).
        """
        return handlers.delete(self, **kwargs)

    def put(self, *args: Any, **kwargs: Any) -> Reply:
        """Not served unless overridden: raises :class:`MethodNotServed` (405 with ``Allow``)."""
        raise self._not_served("put")

    def patch(self, *args: Any, **kwargs: Any) -> Reply:
        """Change task ``uuid``: ``{"status": "paused"}`` suspends a running task's process tree,
        ``{"status": "running"}`` resumes it, ``{"priority": n}`` moves a queued task. 200 with the task object.

        .. versionchanged:: 0.3
            Served by default (it answered 405 unless overridden).
        """
        return handlers.patch(self, *args, **kwargs)

    def head(self, *args: Any, **kwargs: Any) -> Reply:
        """Unless overridden, the resource answers HEAD as Flask does: GET without the body."""
        raise self._not_served("head")

    def options(self, *args: Any, **kwargs: Any) -> Reply:
        """Unless overridden, Flask answers OPTIONS itself, with an ``Allow`` header."""
        raise self._not_served("options")

    def trace(self, *args: Any, **kwargs: Any) -> Reply:
        """Not served unless overridden: raises :class:`MethodNotServed` (405 with ``Allow``)."""
        raise self._not_served("trace")

    def artifacts(self, uuid: str, name: Optional[str] = None) -> Any:
        """``GET <item>/artifacts``: ``{"artifacts": [...]}``, the task's artifacts as kept now; with ``name``
        (``GET <item>/artifacts/<name>``), the download of that one (see :func:`.artifacts.artifact_response`).

        Called through :meth:`handler` (so behind the class's ``decorator``), in a request; the task must be
        visible to the request's tenant.

        :raises TaskNotFound: no such task (or not the tenant's).
        :raises InvalidArtifactName: ``name`` cannot be an artifact's (a path, ``..``...).
        :raises ArtifactNotFound: the task has no artifact ``name``.

        .. versionadded:: 0.4
        """
        row = self._row(uuid)
        if name is None:
            return {"uuid": row["uuid"], "artifacts": artifacts_module.list_artifacts(self, row)}
        return artifacts_module.artifact_response(self, row, name)

    def handler(self, method: str) -> Callable[..., Any]:
        """The HTTP method ``method`` of this controller, wrapped once in the class's ``decorator``."""
        wrapped = self._handlers.get(method)
        if wrapped is None:
            function = getattr(type(self), method)
            decorator = self._decorator or handlers.log_call(self.logger, self.name)  # type: ignore[misc]
            wrapped = self._handlers[method] = functools.partial(decorator(function), self)  # type: ignore[call-arg]
        return wrapped

    def overrides(self, method: str) -> bool:
        """Whether this controller's class defines its own handler of HTTP method ``method``.

        .. versionadded:: 0.3
        """
        return getattr(type(self), method) is not getattr(MetaMPController, method)

    def served_methods(self) -> tuple[str, ...]:
        """The HTTP methods this controller answers, upper case, in the order of an ``Allow`` header.

        GET, POST, PATCH and DELETE when it has a task; any method its class overrides; HEAD
        with GET, and OPTIONS, as Flask adds them.

        .. versionadded:: 0.3
        """
        served = {method for method in HTTP_METHODS if self.overrides(method)}
        if self.target_task is not None:
            served |= TASK_HANDLERS
        if "get" in served:
            served.add("head")
        served.add("options")
        return tuple(method.upper() for method in HTTP_METHODS if method in served)

    def require_task(self, method: str) -> None:
        """Raise :class:`NoTargetTask` if this controller has no task for ``method``'s default to work on."""
        if self.target_task is None:
            raise NoTargetTask(f"Controller {self.name} has no target_task, so it runs no tasks: override "
                               f"{method}() in its class to serve {method.upper()}.", self.served_methods())

    def _not_served(self, method: str) -> MethodNotServed:
        return MethodNotServed(f"Controller {self.name} does not serve {method.upper()}: override {method}() "
                               f"in its class to serve it.", self.served_methods())

    # -- internals -------------------------------------------------------------------

    def _row(self, uuid: str) -> Row:
        uuid = parse_uuid(uuid)
        self._started()
        row = self.store.get(uuid)
        if row is None or row["controller"] != self.name or not self.visible(row):
            raise TaskNotFound(uuid)
        return row

    def _started(self) -> None:
        """Start the controller on its first use (reads included), if it has a task to run."""
        if self.target_task is not None:
            self._activate()

    def current_tenant(self) -> Any:
        """The tenant of the request being served: the ``tenant=`` hook's answer (see :func:`hook_tenant`).

        None outside a request or without a hook; :data:`ALL_TENANTS` when the hook says the request
        may see every tenant's tasks (an operator).
        """
        if self.tenant is None or not handlers.in_request():
            return None
        return hook_tenant(self.tenant())

    def task_tenant(self, tenant: Optional[str] = None) -> Optional[str]:
        """The tenant a task queued now is stamped with.

        ``tenant`` when given; else the request's (None in a request of a controller without a hook:
        nobody in particular); :data:`SYSTEM_TENANT` for a task no request made (the Python API or
        the CLI outside a request) or one an operator's request (hook answer :data:`ALL_TENANTS`) made.

        :raises TypeError: ``tenant`` is not a string.
        """
        if tenant is not None:
            if not isinstance(tenant, str):
                raise TypeError(f"tenant= is a string, not {tenant!r}.")
            return tenant
        if not handlers.in_request():
            return SYSTEM_TENANT
        current = self.current_tenant()
        return SYSTEM_TENANT if current is ANY_TENANT else current

    def tenant_filter(self) -> Any:
        """What lists are filtered by: the request's tenant, or every tenant (no hook, no request, or a hook
        answering :data:`ALL_TENANTS`). A hook answering None gives None: the tasks of nobody in
        particular, never the system's (:data:`SYSTEM_TENANT`)."""
        if self.tenant is None or not handlers.in_request():
            return ANY_TENANT
        return self.current_tenant()

    def visible(self, row: Row) -> bool:
        """Whether the request being served may see ``row`` (its tenant's, when the controller has a hook)."""
        wanted = self.tenant_filter()
        return wanted is ANY_TENANT or row.get("tenant") == wanted

    def queue_state(self, counts: Optional[dict[str, int]] = None) -> QueueState:
        """What this controller's queued tasks wait behind (see :mod:`.waiting`), read from the store at most
        once per :data:`~.defaults.QUEUE_STATE_TTL` seconds in this process.

        :param counts: every tenant's counts per status, when the caller just read them: a stale state is
            read again with them (one query less).
        """
        kept = self._queue_state
        now = time.monotonic()
        if kept is not None and kept[0] > now:
            return kept[1]
        state = read_queue_state(self.store, self.name, self.max_num_process, counts, self._wait_limits())
        self._queue_state = (now + defaults.QUEUE_STATE_TTL, state)
        return state

    def _present(self, row: Row, queue: Optional[QueueState] = None) -> TaskObject:
        queued = row["status"] == TaskStatus.QUEUED
        position = self.store.position(row) if queued else None
        live = None
        runtime = self._side
        if runtime is not None and row["status"] not in TERMINAL:
            live = runtime.local_run(row["uuid"])
        if queued and queue is None:
            queue = self.queue_state()
        return present(row, position, live, queue=queue)

    def _present_item(self, row: Row) -> TaskObject:
        """The task object of one task read on its own: with its ``reruns`` (one indexed read of the store, for
        an ended task only: only those are run again)."""
        reruns: list[str] = []
        if row["status"] in TERMINAL:
            reruns = self.store.reruns(self.name, row["uuid"], defaults.RERUNS_SHOWN)
        task = self._present(row)
        task["reruns"] = reruns
        return task

    def client_view(self, row: Row) -> TaskObject:
        """The task object of a stored row as HTTP clients see it (see :meth:`client_view_of`)."""
        return self.client_view_of(self._present(row))

    def client_view_of(self, task: TaskObject) -> TaskObject:
        """A task object as HTTP clients see it: no traceback unless the controller (or debug mode) says so, and
        no exception text at all when ``expose_errors`` is off."""
        if not self.expose_errors:
            return hide_error_text(task)  # the traceback holds the text too: hidden with it, debug or not
        if self.expose_tracebacks or (has_app_context() and current_app.debug):
            return task
        return hide_traceback(task)

    def _present_new(self, rows: list[Row]) -> list[TaskObject]:
        """Task objects of rows just queued together: one position query, not one per row.

        Rows of one priority were inserted together, so they stand one after another in
        the queue (with any tasks claimed meanwhile, positions are at most that high).
        """
        if len({row["priority"] for row in rows}) != 1:
            return [self._present(row) for row in rows]
        first = self.store.position(rows[0])
        queue = self.queue_state()
        return [present(row, None if first is None else first + i, queue=queue) for i, row in enumerate(rows)]

    def _effective_timeout(self, requested: Optional[float]) -> Optional[float]:
        return effective_timeout(self.timeout, requested)

    # -- limits (see .limits) ----------------------------------------------------------

    def _admit(self, rows: list[Row]) -> None:
        """Stamp new rows with their ``concurrency_key`` and ``resources``, and refuse them when they could never
        start (:class:`ResourcesUnavailable`, 422) or their tenant is over its quota (:class:`QuotaExceeded`, 429)."""
        stamp(rows, self._key_function, self.resources)
        if self.resources is not None:
            check_fits_some_host(self.resources, self._read_limit("capacities", self._live_capacities),
                                 self.target_task.__name__ if self.target_task is not None else self.name)
        if self.tenant_quota is not None and rows:
            usage = self._read_limit("usage", lambda: self.quota_usage())
            refuse_over_quota(usage, rows[0].get("tenant"), self.store.now())

    def _read_limit(self, what: str, read: Callable[[], Any]) -> Any:
        """What ``read`` answers, kept :data:`~.defaults.LIMITS_TTL` seconds in this process."""
        kept = self._limits_read.get(what)
        now = time.monotonic()
        if kept is not None and kept[0] > now:
            return kept[1]
        value = read()
        self._limits_read[what] = (now + defaults.LIMITS_TTL, value)
        return value

    def _live_capacities(self) -> dict[str, Mapping[str, float]]:
        """The published capacities of the hosts with a live serving process (heartbeat within ``lease``)."""
        store = self.store
        return live_capacities(store.capacities(), store.known_hosts(), store.now(), self.lease)

    def quota_usage(self) -> dict[Optional[str], TenantUsage]:
        """Each tenant's CPU seconds in the ``tenant_quota`` window (tasks ended in it, and running), read from
        the store; empty without a quota.

        .. versionadded:: 0.4
        """
        quota = self.tenant_quota
        if quota is None:
            return {}
        self._started()
        now = self.store.now()
        return quota_usage(self.store.ended_cpu(self.name, now - quota.window), self.store.active(self.name),
                           quota, now)

    def usage(self) -> dict[str, Any]:
        """The controller's quota usage as ``<prefix>/api/usage`` shows it: ``{"controller", "quota", "window",
        "tenants": [...]}``, each tenant's CPU seconds in the window, whether it is over, and the seconds until
        it is not (``retry_after``). In a request of a controller with a ``tenant=`` hook, only the request's
        tenant. ``quota`` and ``window`` are null (and ``tenants`` empty) without a ``tenant_quota``.

        .. versionadded:: 0.4
        """
        quota = self.tenant_quota
        wanted = self.tenant_filter()
        tenants: list[dict[str, Any]] = []
        if quota is not None:
            now = self.store.now()
            usage = self.quota_usage()
            if wanted is not ANY_TENANT and wanted not in usage:
                usage[wanted] = TenantUsage(wanted, 0.0, quota.cpu_seconds, quota.window, None)
            tenants = [usage[t].to_json(now) for t in sorted(usage, key=lambda t: (t is not None, t or ""))
                       if wanted is ANY_TENANT or t == wanted]
        return {"controller": self.name, "quota": None if quota is None else quota.cpu_seconds,
                "window": None if quota is None else quota.window, "tenants": tenants}

    def stamp_scheduled(self, rows: list[Row]) -> None:
        """Stamp the task a schedule's firing queues (its key and resources; no submit check: the firing is the
        system's, and a task that cannot start yet waits)."""
        try:
            stamp(rows, self._key_function, self.resources)
        except MPCError as exc:
            self.logger.warning("A scheduled task of %s gets no concurrency key: %s", self.name, exc)
            stamp(rows, None, self.resources)

    def _wait_limits(self) -> Optional[WaitLimits]:
        """What this controller's limits make queued tasks wait on (see :func:`.waiting.read_queue_state`)."""
        if self.max_per_key is None and self.max_per_tenant is None and self.resources is None \
                and self.tenant_quota is None:
            return None
        held: frozenset[Optional[str]] = frozenset()
        if self.tenant_quota is not None:
            held = frozenset(t for t, u in self.quota_usage().items() if u.over)
        return WaitLimits(max_per_key=self.max_per_key, max_per_tenant=self.max_per_tenant,
                          capacities=self._live_capacities() if self.resources is not None else None,
                          held_tenants=held)
