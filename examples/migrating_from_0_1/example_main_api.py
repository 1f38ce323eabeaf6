"""The task side of a 0.1-style app: a task, a controller from the factory, an ``Api`` to mount later.

The controller posts a callback to ``/local_callback`` (``example_local_callback_api.py``)
when each task starts and when it ends.
"""
import logging
import os
import time

from flask_restful import Api

from flask_multiprocess_controller import MetaMPTask, TemplateFactory

PORT = int(os.environ.get("PORT", "8050"))


class MainTask(MetaMPTask):
    """Counts to ``steps``, half a second a step (``delay``), and can be stopped between steps."""

    def execute(self, *args, **kwargs) -> None:
        task_logger = logging.getLogger(f"Main-{os.getpid()}")
        task_logger.info("MAIN_TASK starts in process %d with %s", os.getpid(), kwargs)
        for step in range(1, int(kwargs.get("steps", 20)) + 1):
            task_logger.debug("step %d", step)  # DEBUG: shown only if the app's logging asks for it
            time.sleep(float(kwargs.get("delay", 0.5)))
            self.upload_status(step)  # what GET shows as progress
            self.set_checkpoint()  # a DELETE stops the task here
        task_logger.info("Execution finished!")


main_api = Api()
# The controller is created at import time, before the server starts threads (docs/operations.md says why).
main_controller = TemplateFactory.MPController(name="Main")(
    target_task=MainTask, max_num_process=2, callback_url=f"http://127.0.0.1:{PORT}/local_callback")
main_api.add_resource(TemplateFactory.MPResource(name="Main"), "/main", resource_class_args=(main_controller,))
