import time

from flask import Flask
from flask_restful import Api
from flask_multiprocess_controller import TemplateFactory, MetaMPTask

class SampleTask(MetaMPTask):

    def execute(self, *args, **kwargs) -> None:
        # some actions to do when receiving HTTP requests
        steps = int(kwargs.get('steps', 3))
        delay = float(kwargs.get('delay', 0.2))
        # upload status to the controller
        self.upload_status('some_msg')
        # check the stop signal, if flagged raise to the exception catcher
        self.checkpoint()
        for step in range(steps):
            time.sleep(delay)
            self.upload_status({'step': step + 1, 'of': steps})
            self.set_checkpoint()
        return

sample_api = Api()
sample_controller = TemplateFactory.MPController(name='Sample')(target_task=SampleTask, max_num_process=2)
sample_api.add_resource(TemplateFactory.MPResource(), '/sample', resource_class_args=(sample_controller,))
app = Flask('Sample')
sample_api.init_app(app)
app.run()
