"""The controller's settings: what each keyword may be, how an app's ``MPC_*`` configuration sets them, and
the runtime's configuration derived from them (one place for all three)."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import defaults, registry
from .engine.config import RuntimeConfig
from .engine.handover import configured_window
from .engine.logs import MetaMPLoggerConfigurator
from .engine.retries import RetryPolicy
from .exceptions import NoTargetTask
from .task import MetaMPTask

if TYPE_CHECKING:
    from .controller import MetaMPController


class WorkerLogSetup(MetaMPLoggerConfigurator):
    """The default: task processes log through the queue; the serving process keeps its own setup."""

    @staticmethod
    def listener_log_setup() -> None:
        pass


def check_callback_url(url: Any) -> None:
    """Refuse a ``callback_url`` that is not an http(s) URL string (or None)."""
    if url is None:
        return
    if not isinstance(url, str):
        raise TypeError(
            f"callback_url must be an http(s) URL string or None, not {type(url).__name__} {url!r}. The "
            f"positional order is (target_task, callback_url, max_num_process, max_num_queue, "
            f"logger_configurator_cls), as in 0.1: pass max_num_process=... by keyword.")
    if url and not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"callback_url must be an http:// or https:// URL, not {url!r}.")


def flag(value: Any) -> bool:
    """A yes/no setting: a bool, 0 or 1, or a word (``true``/``false``, ``yes``/``no``, ``on``/``off``), so
    that ``MPC_EXPOSE_ERRORS=false`` from an environment file means no rather than a non-empty string."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(value)
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise ValueError(value)


def max_pause_setting(value: Any) -> Optional[float]:
    """A ``max_pause`` (seconds, finite, not negative) as the runtime takes it: None for no limit (None or 0).

    :raises ValueError: anything else.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"max_pause must be a number of seconds or None, not {value!r}.")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_pause must be a number of seconds or None, not {value!r}.") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"max_pause must be a finite number of seconds, 0 or more (0: no limit), "
                         f"not {value!r}.")
    return seconds or None


def pause_expiry_setting(value: Any) -> str:
    """A ``pause_expiry``: ``"resume"`` or ``"stop"``.

    :raises ValueError: anything else.
    """
    if value not in defaults.PAUSE_EXPIRIES:
        raise ValueError(f"pause_expiry must be 'resume' or 'stop', not {value!r}.")
    return str(value)


def check_pause_settings(max_pause: Any, pause_expiry: Any, timeout_while_paused: Any,
                         can_change: Any) -> None:
    """Check the controller's pause keywords and its ``can_change`` hook (ValueError or TypeError naming the
    one that is wrong)."""
    max_pause_setting(max_pause)
    pause_expiry_setting(pause_expiry)
    if not isinstance(timeout_while_paused, bool):
        raise TypeError(f"timeout_while_paused must be True or False, not {timeout_while_paused!r}.")
    if can_change is not None and not callable(can_change):
        raise TypeError(f"can_change must be a callable (action, task) -> bool evaluated in the request "
                        f"context, not {can_change!r}.")


#: How each ``MPC_*`` setting of an app's config becomes a controller setting.
APP_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "stop_grace": float, "retention": float, "max_content_length": int, "max_wait": float,
    "expose_tracebacks": flag, "handover_window": float, "shutdown_wait": float,
    "max_message_size": int, "expose_errors": flag, "idempotency_ttl": float,
    "max_pause": max_pause_setting, "pause_expiry": pause_expiry_setting, "timeout_while_paused": flag,
    "callback_max_age": float, "artifacts_url": str, "max_artifact_size": int, "max_artifacts": int,
    "progress_flush": float,
}

#: What a setting must be, in the message refusing a bad value (where the converter's name would not say).
_SETTING_KINDS = {"max_pause": "number of seconds (0: no limit)", "pause_expiry": "'resume' or 'stop'",
                  "timeout_while_paused": "true or false"}


#: Settings a started runtime has taken for good; the others are read at each request.
FROZEN_SETTINGS = frozenset({"stop_grace", "retention", "handover_window", "shutdown_wait", "max_message_size",
                             "max_pause", "pause_expiry", "timeout_while_paused",
                             "callback_max_age", "artifacts_url", "max_artifact_size", "max_artifacts",
                             "progress_flush"})


def app_setting(key: str, value: Any) -> Any:
    """The controller setting ``key`` of a config value, checked."""
    try:
        converted = APP_SETTINGS[key](value)
    except (TypeError, ValueError):
        kind = _SETTING_KINDS.get(key) or (
            "true or false" if APP_SETTINGS[key] is flag else f"a {APP_SETTINGS[key].__name__}")
        raise ValueError(f"MPC_{key.upper()} must be {kind}, not {value!r}.") from None
    if (isinstance(converted, (int, float)) and not isinstance(converted, bool)
            and (not math.isfinite(converted) or converted < 0
                 or (key in ("max_wait", "max_message_size", "idempotency_ttl") and converted == 0))):
        raise ValueError(f"MPC_{key.upper()} must be positive, not {value!r}.")
    return converted


def env_shutdown_wait() -> float:
    """``MPC_SHUTDOWN_WAIT`` from the environment, checked (the default when unset or empty)."""
    raw = os.environ.get(defaults.SHUTDOWN_WAIT_ENV)
    return defaults.SHUTDOWN_WAIT if raw in (None, "") else app_setting("shutdown_wait", raw)


def env_progress_flush() -> float:
    """``MPC_PROGRESS_FLUSH`` from the environment, checked (the default when unset or empty)."""
    raw = os.environ.get(defaults.PROGRESS_FLUSH_ENV)
    return defaults.PROGRESS_FLUSH if raw in (None, "") else app_setting("progress_flush", raw)


def pick_configurator(*given: Optional[type[MetaMPLoggerConfigurator]]) -> Optional[type[MetaMPLoggerConfigurator]]:
    """The configurator named by ``logger_configurator_cls`` and/or ``log_configurator`` (None: neither)."""
    named = {c for c in given if c is not None}
    if len(named) > 1:
        raise TypeError("logger_configurator_cls and log_configurator name the same setting: pass one of them.")
    configurator = named.pop() if named else None
    if configurator is not None and not (isinstance(configurator, type)
                                         and issubclass(configurator, MetaMPLoggerConfigurator)):
        raise TypeError(f"The log configurator must be a MetaMPLoggerConfigurator subclass, not {configurator!r}.")
    return configurator


def check_arguments(target_task: Optional[type[MetaMPTask]], callback_url: Any, max_num_process: Any,
                    max_num_queue: Any, timeout: Optional[float], stop_grace: float, max_tasks_per_child: int,
                    configurators: tuple[Optional[type[MetaMPLoggerConfigurator]], ...], role: Optional[str],
                    tenant: Any, **sizes: Any) -> Optional[type[MetaMPLoggerConfigurator]]:
    """Check the controller's arguments (ValueError or TypeError naming the one that is wrong); return the
    log configurator they name, if any."""
    if target_task is not None and not (isinstance(target_task, type) and issubclass(target_task, MetaMPTask)):
        raise TypeError(f"target_task must be a MetaMPTask subclass or None, not {target_task!r}.")
    check_callback_url(callback_url)
    if not isinstance(max_num_process, int) or max_num_process < 1:
        raise ValueError(f"max_num_process must be a positive integer, not {max_num_process!r}.")
    if not isinstance(max_num_queue, int) or max_num_queue < -1:
        raise ValueError(f"max_num_queue must be -1 (no bound) or a non-negative integer, not {max_num_queue!r}.")
    configurator = pick_configurator(*configurators)
    if timeout is not None and not (_finite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}.")
    if not (_finite(stop_grace) and stop_grace >= 0):
        raise ValueError(f"stop_grace must be a number of seconds, not negative, not {stop_grace!r}.")
    if max_tasks_per_child < 0:
        raise ValueError("max_tasks_per_child must be 1 or more, or 0 for no limit.")
    if target_task is not None:
        RetryPolicy.of(target_task)  # a bad retry setting fails here, not at the first failure
    for name, value in sizes.items():
        if not _finite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number, not {value!r}.")
    if role not in (None, registry.SERVER, registry.CLIENT):
        raise ValueError(f"role must be 'server' or 'client', not {role!r}.")
    if tenant is not None and not callable(tenant):
        raise TypeError(f"tenant must be a callable evaluated in the request context, not {tenant!r}.")
    return configurator


def _finite(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool, NaN or an infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def runtime_config(controller: "MetaMPController") -> RuntimeConfig:
    """What the runtime of ``controller`` is configured with: derived from its settings, never kept apart."""
    task = controller.target_task
    if task is None:
        raise NoTargetTask(f"Controller {controller.name} has no target_task.", controller.served_methods())
    return RuntimeConfig(
        name=controller.name, target_task=task, max_num_process=controller.max_num_process,
        stop_grace=controller.stop_grace, max_memory=controller.max_memory,
        max_tasks_per_child=controller.max_tasks_per_child, retention=controller.retention, lease=controller.lease,
        logger=controller.logger, configurator=controller.log_configurator, context=controller.context_view(),
        limits=controller.limits, expose_tracebacks=controller.expose_tracebacks, expose_errors=controller.expose_errors,
        max_num_queue=controller.max_num_queue, slots=controller.slots, shutdown_wait=controller.shutdown_wait,
        handover_window=configured_window(controller.handover_window), max_pause=controller.max_pause,
        pause_expiry=controller.pause_expiry, timeout_while_paused=controller.timeout_while_paused,
        callback_max_age=controller.callback_max_age, max_per_key=controller.max_per_key,
        max_per_tenant=controller.max_per_tenant, fair_share=controller.fair_share,
        tenant_quota=controller.tenant_quota, stamp=controller.stamp_scheduled,
        progress_flush=controller.progress_flush)
