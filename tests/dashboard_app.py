"""``examples/app.py`` served on 127.0.0.1:$PORT for the dashboard's browser tests, with one more controller.

The example is loaded as it is. The ``echo`` controller added here runs a task that publishes the
text it is given as its progress, logs it, waits until the file ``gate`` exists (checking for stop
requests) and fails with that text when asked: what a hostile client or task may write, for the
tests that check the page shows it as text. The ``flaky`` controller's task fails on each of its
two attempts (retry history), and has a schedule. The ``resumes`` controller's task saves a state and
fails on its first attempt, and returns the state it resumed from on its second. The ``keyed`` controller runs
the echo task one per ``text`` at a time (``concurrency_key="text"``, ``max_per_key=1``).
"""
from __future__ import annotations

import os
import time

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask

from serverproc import load_example_app


class Echo(MetaMPTask):
    """Publish ``text`` as progress and in the log; wait for ``gate``; fail with ``text`` if ``fail``."""

    def execute(self, text: str = "", gate: str = "", fail: bool = False) -> str:
        self.upload_status(text)
        self.logger.info("echo %s", text)
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.02)
        if fail:
            raise ValueError(text)
        return text


class EchoController(MetaMPController, controller_name="echo"):
    pass


class Flaky(MetaMPTask):
    """Fails with ``ConnectionError(why)`` on every attempt: one retry, then the task fails."""

    max_retries = 1
    retry_backoff = 0.1
    retry_backoff_max = 0.2

    def execute(self, why: str = "flaky") -> None:
        raise ConnectionError(why)


class FlakyController(MetaMPController, controller_name="flaky"):
    pass


class Resumes(MetaMPTask):
    """Saves ``{"reached": reached}`` and fails on its first attempt; returns what it resumed from next."""

    max_retries = 1
    retry_backoff = 0.1
    retry_backoff_max = 0.2

    def execute(self, reached: int = 1) -> dict:
        if self.state is None:
            self.save_state({"reached": reached})
            raise ConnectionError("cut off after saving")
        return {"resumed_from": self.state}


class ResumesController(MetaMPController, controller_name="resumes"):
    pass


example = load_example_app()
echo = EchoController(Echo, max_num_process=2, stop_grace=1,
                      expose_tracebacks=os.environ.get("ECHO_TRACEBACKS") == "1")
app = example.app
# Share links are signed with it.
app.config["SECRET_KEY"] = os.environ.get("SECRET_KEY", "dashboard tests")
# How long an event stream lasts before the browser reconnects (read at each request).
app.config["MPC_MAX_WAIT"] = float(os.environ.get("STREAM_SECONDS", "25"))
example.api.add_resource(MetaMPResource, "/echo", "/echo/<string:uuid>", endpoint="echo", resource_class_args=(echo,))
flaky = FlakyController(Flaky, max_num_process=1)
flaky.schedule("nightly", every=86400, kwargs={"why": "nightly"})  # fires at midnight UTC only
example.api.add_resource(MetaMPResource, "/flaky", "/flaky/<string:uuid>", endpoint="flaky",
                         resource_class_args=(flaky,))
resumes = ResumesController(Resumes, max_num_process=1)
example.api.add_resource(MetaMPResource, "/resumes", "/resumes/<string:uuid>", endpoint="resumes",
                         resource_class_args=(resumes,))


class KeyedController(MetaMPController, controller_name="keyed"):
    pass


keyed = KeyedController(Echo, max_num_process=2, stop_grace=1, concurrency_key="text", max_per_key=1)
example.api.add_resource(MetaMPResource, "/keyed", "/keyed/<string:uuid>", endpoint="keyed",
                         resource_class_args=(keyed,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
