"""The Flask extension object: configuration, the operator's URLs, and the ``flask mpc`` commands.

``MultiprocessController(app)`` or ``mpc = MultiprocessController()`` … ``mpc.init_app(app)``
(flask-sqlalchemy's pattern: the per-app state lives in ``app.extensions["mpc"]``, the object
keeps no app). ``init_app`` reads the app's ``MPC_*`` settings, hands them to every controller
of the process (those made before and after it: controllers register themselves), starts them,
and registers under ``MPC_URL_PREFIX`` the health endpoint and the task API, every view wrapped
in the extension's ``decorator=``.
"""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from flask import Flask

from . import defaults, registry

if TYPE_CHECKING:
    from .controller import MetaMPController

#: The app settings the extension reads, with their defaults (documented in the README).
CONFIG_DEFAULTS: dict[str, Any] = {
    "MPC_URL_PREFIX": defaults.URL_PREFIX,
    "MPC_STORE_URL": None,
    "MPC_MAX_CONTENT_LENGTH": defaults.MAX_CONTENT_LENGTH,
    "MPC_RETENTION": defaults.RETENTION,
    "MPC_STOP_GRACE": defaults.STOP_GRACE,
    "MPC_MAX_WAIT": defaults.MAX_WAIT,
    "MPC_EXPOSE_TRACEBACKS": False,
    # None: the MPC_MAX_STREAMS environment variable, else defaults.MAX_STREAMS (see http.sse.stream_config).
    "MPC_MAX_STREAMS": None,
    "MPC_STREAM_SEND_TIMEOUT": defaults.STREAM_SEND_TIMEOUT,
    "MPC_STREAM_BUFFER": defaults.STREAM_BUFFER,
}

#: A view decorator (authentication, say) applied to every URL the extension registers.
ViewDecorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass
class ExtensionState:
    """What the extension keeps per app, in ``app.extensions["mpc"]``."""

    extension: "MultiprocessController"
    #: The URL prefix of the extension's views.
    prefix: str
    #: The app's ``MPC_*`` settings as read by ``init_app``.
    settings: dict[str, Any]


class MultiprocessController:
    """The Flask extension of flask-multiprocess-controller.

    :param app: an app to initialise at once (else call :meth:`init_app` later).
    :param decorator: wraps every view the extension registers (the health endpoint, the task
        API): put the app's authentication here, for these URLs show every task otherwise.

    .. versionadded:: 0.3
    """

    def __init__(self, app: Optional[Flask] = None, decorator: Optional[ViewDecorator] = None) -> None:
        self.decorator = decorator
        registry.note_extension()
        if app is not None:
            self.init_app(app)

    def register(self, controller: "MetaMPController") -> None:
        """Add a controller to the process's registry (controllers do this themselves when created)."""
        registry.register(controller)

    def init_app(self, app: Flask) -> None:
        """Read the app's ``MPC_*`` settings, bind and start the controllers, register the URLs and commands.

        :raises RuntimeError: the app was already initialised by an extension object.
        """
        if "mpc" in app.extensions:
            raise RuntimeError("This app was already initialised with a MultiprocessController; make one "
                               "extension object per app and call init_app(app) once.")
        for key, value in CONFIG_DEFAULTS.items():
            app.config.setdefault(key, value)
        settings = {key: value for key, value in app.config.items() if key.startswith("MPC_")}
        prefix = "/" + str(settings["MPC_URL_PREFIX"]).strip("/")
        state = ExtensionState(self, "" if prefix == "/" else prefix, settings)
        app.extensions["mpc"] = state
        for controller in registry.controllers():
            controller.bind(settings, app.instance_path)
        from .ops.cli import mpc_commands
        from .http.sse import stream_config
        from .http.views import make_blueprint

        stream_config(app.config)  # a bad stream setting fails here, not at the first stream

        app.register_blueprint(make_blueprint(self), url_prefix=state.prefix or None)
        app.cli.add_command(mpc_commands)
        if os.environ.get("FLASK_RUN_FROM_CLI") != "true":
            # A server (gunicorn, `python app.py`): its controllers start now, so that tasks queued elsewhere and
            # tasks handed over by the processes it replaces run without waiting for its first request. Under the
            # `flask` command (`flask mpc ...`, `flask run`) they start at their first use instead.
            with app.app_context():
                for controller in registry.controllers():
                    if controller.target_task is not None:
                        controller.start_serving()

    @staticmethod
    def controllers() -> list["MetaMPController"]:
        """The controllers of this process that run tasks, by name."""
        return [c for c in registry.controllers() if c.target_task is not None]

    @staticmethod
    def controller(name: str) -> "MetaMPController":
        """The controller called ``name``.

        :raises LookupError: no controller has that name.
        """
        for candidate in MultiprocessController.controllers():
            if candidate.name == name:
                return candidate
        known = ", ".join(c.name for c in MultiprocessController.controllers()) or "none"
        raise LookupError(f"No controller is called {name!r} (known: {known}).")
