"""The settings a controller hands to its runtime, frozen once the controller is built."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

from .. import defaults
from .logs import MetaMPLoggerConfigurator
from .protocol import Limits
from .retries import RetryPolicy
from ..task import MetaMPTask


@dataclass(frozen=True)
class Settings:
    """The controller settings that supervising a task process needs (a view of :class:`RuntimeConfig`).

    Built by :attr:`RuntimeConfig.supervision`; a hand-over carries it to the process that settles the
    tasks left behind.
    """

    stop_grace: float
    max_memory: Optional[int]
    fresh_process: bool
    limits: Limits = Limits(result_bytes=defaults.MAX_RESULT_SIZE, progress_bytes=defaults.MAX_PROGRESS_SIZE,
                            state_bytes=defaults.MAX_STATE_SIZE)
    #: Seconds a task may stay paused before :attr:`pause_expiry` applies (None: no limit).
    max_pause: Optional[float] = defaults.MAX_PAUSE
    #: ``"resume"`` or ``"stop"``: what ends a pause longer than :attr:`max_pause`.
    pause_expiry: str = defaults.PAUSE_EXPIRY
    #: Whether the timeout counts the time a task is paused.
    timeout_while_paused: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    """What the moving parts of one controller need to know about it (see :class:`MetaMPController`)."""

    #: The controller's name in the store.
    name: str
    target_task: type[MetaMPTask]
    max_num_process: int
    stop_grace: float
    max_memory: Optional[int]
    max_tasks_per_child: int
    retention: float
    lease: float
    logger: logging.Logger
    configurator: type[MetaMPLoggerConfigurator]
    limits: Limits
    #: Whether callbacks show ``error.traceback``.
    expose_tracebacks: bool = False
    #: Whether callbacks show the text of a task's exception (else its type only).
    expose_errors: bool = True
    #: Handed to each task as ``self.context``.
    context: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: Queued tasks allowed (-1: no bound): what a schedule's firing may meet.
    max_num_queue: int = -1
    #: Seconds running tasks wait to be adopted when this process ends (0: they are stopped; see .handover).
    handover_window: float = 0.0
    #: Controlling threads (slots) of this process; None: ``max_num_process``. Only the slot count:
    #: ``max_num_process`` stays the limit across every process, enforced by the store.
    slots: Optional[int] = None
    #: Seconds a shutting-down process lets its running tasks finish on their own before stopping them.
    shutdown_wait: float = 0.0
    #: Seconds a task may stay paused (None: no limit), what ends a longer pause, and whether the timeout
    #: counts paused time (see :mod:`.pausing`).
    max_pause: Optional[float] = defaults.MAX_PAUSE
    pause_expiry: str = defaults.PAUSE_EXPIRY
    timeout_while_paused: bool = True
    #: Seconds an undelivered callback stays in the store's outbox before it is dropped (logged, counted).
    callback_max_age: float = defaults.CALLBACK_MAX_AGE
    #: Running tasks per ``concurrency_key`` at most, and per tenant at most (None: no bound); whether claims
    #: share out between tenants (see :mod:`..store.claimrules`).
    max_per_key: Optional[int] = None
    max_per_tenant: Optional[int] = None
    fair_share: bool = True
    #: Each tenant's CPU quota (a :class:`~..limits.QuotaSpec`), whose tenants over it are held (None: none).
    tenant_quota: Optional[Any] = None
    #: Gives the rows a schedule's firings queue their ``concurrency_key`` and ``resources`` (None: nothing).
    stamp: Optional[Callable[[list[Any]], None]] = None
    #: Seconds between two writes of the running tasks' progress, all tasks of the process in one write
    #: (see :mod:`.flusher`).
    progress_flush: float = defaults.PROGRESS_FLUSH

    @property
    def slot_count(self) -> int:
        """How many controlling threads this process runs."""
        return self.max_num_process if self.slots is None else self.slots

    @property
    def restartable(self) -> bool:
        """Whether a run cut off by the death of its server is queued again."""
        return bool(self.target_task.restartable)

    @property
    def retry_policy(self) -> RetryPolicy:
        """How the task class's failed attempts are retried."""
        return RetryPolicy.of(self.target_task)

    @property
    def fresh_process(self) -> bool:
        """Whether each task gets a process of its own."""
        return self.max_tasks_per_child == 1

    @property
    def supervision(self) -> Settings:
        """What a supervisor of this controller's task processes needs."""
        return Settings(stop_grace=self.stop_grace, max_memory=self.max_memory, fresh_process=self.fresh_process,
                        limits=self.limits, max_pause=self.max_pause, pause_expiry=self.pause_expiry,
                        timeout_while_paused=self.timeout_while_paused)
