"""An app laid out as upstream 0.1's tutorial lays one out, for the tests that serve it.

``Api()`` objects and controllers are made at import time and ``create_app()`` calls
``init_app`` on them later, so the same module serves with ``python tutorial_app.py``
and with ``gunicorn 'tutorial_app:create_app()'``. Nothing here configures logging:
what reaches standard error is the package's console fallback.

Environment: ``PORT`` (the port served, also in the callback URL), ``CALLBACK_LOG``
(a file the callback receiver appends each event to, one JSON line each) and
``MPC_STORE_URL``.

- ``/main``: a task controller made with ``TemplateFactory``, whose callbacks go to
- ``/local_callback``: a controller with ``target_task=None`` that overrides ``post``;
- ``/legacy``: the same task with ``compat="0.1"``, for clients written for 0.1.
"""
import json
import logging
import os
import time

import flask
from flask_restful import Api

from flask_multiprocess_controller import *  # noqa: F401,F403 - the tutorial's import

PORT = int(os.environ.get("PORT", "8050"))


class MainTask(MetaMPTask):  # noqa: F405
    """Counts ``steps`` steps of ``delay`` seconds, uploading the step number and checking for a stop."""

    def execute(self, *args, **kwargs):
        task_logger = logging.getLogger("Main-" + str(os.getpid()))
        task_logger.info("MainTask starts in process %d with %s", os.getpid(), kwargs)
        steps = int(kwargs.get("steps", 5))
        for step in range(1, steps + 1):
            task_logger.debug("step %d of %d (a DEBUG line)", step, steps)
            time.sleep(float(kwargs.get("delay", 0.05)))
            self.upload_status(step)
            self.set_checkpoint()
        task_logger.info("MainTask %s-%d finished %d steps", self.task_name, self.counter, steps)


class LocalCallbackController(MetaMPController):  # noqa: F405
    """Answers POST locally: it records the callback events of the /main controller."""

    def post(self, **kwarg):
        path = os.environ.get("CALLBACK_LOG")
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(kwarg) + "\n").encode())
            finally:
                os.close(fd)
        self.logger.info("callback received: %s %s", kwarg.get("event"), kwarg.get("uuid"))
        return kwarg


main_api = Api()
main_controller = TemplateFactory.MPController(name="Main")(  # noqa: F405
    target_task=MainTask, max_num_process=2, callback_url=f"http://127.0.0.1:{PORT}/local_callback")
main_api.add_resource(TemplateFactory.MPResource(name="Main"), "/main",  # noqa: F405
                      resource_class_args=(main_controller,))

local_callback_api = Api()
local_callback_controller = LocalCallbackController(target_task=None, max_num_process=1)
local_callback_api.add_resource(TemplateFactory.MPResource(), "/local_callback",  # noqa: F405
                                resource_class_args=(local_callback_controller,))

legacy_api = Api()
legacy_controller = TemplateFactory.MPController(name="Legacy")(  # noqa: F405
    target_task=MainTask, max_num_process=2, compat="0.1")
legacy_api.add_resource(TemplateFactory.MPResource(name="Legacy"), "/legacy",  # noqa: F405
                        resource_class_args=(legacy_controller,))


def create_app():
    """The app factory: gunicorn 'tutorial_app:create_app()'."""
    app = flask.Flask(__name__)
    main_api.init_app(app)
    local_callback_api.init_app(app)
    legacy_api.init_app(app)
    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=PORT)
