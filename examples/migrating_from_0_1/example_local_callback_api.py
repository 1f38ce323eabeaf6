"""A controller that runs no task and answers POST itself: here, the receiver of the callbacks."""
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, TemplateFactory


class LocalCallbackController(MetaMPController):
    def post(self, **kwarg):
        # self.logger prints on stderr while the app has not configured logging.
        self.logger.info("callback received: %s %s", kwarg.get("event"), kwarg.get("uuid"))
        return kwarg  # a plain dict: 200


local_callback_api = Api()
# target_task=None: no fork server, no thread; only the methods the class overrides are served.
local_callback_controller = LocalCallbackController(target_task=None)
local_callback_api.add_resource(TemplateFactory.MPResource(), "/local_callback",
                                resource_class_args=(local_callback_controller,))
