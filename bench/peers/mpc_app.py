"""The benchmark's Flask app: the bench task mounted at ``/tasks`` and ``/tasks/<uuid>``.

Dev server: ``python bench/peers/mpc_app.py`` (port from ``PORT``); gunicorn:
``gunicorn bench.peers.mpc_app:app``. The controller is configured by ``BENCH_*`` variables
(see :func:`bench.peers.mpc_tasks.from_environment`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from flask import Flask  # noqa: E402
from flask_restful import Api  # noqa: E402

from bench.peers.accounting import install_write_counter  # noqa: E402
from bench.peers.mpc_tasks import from_environment  # noqa: E402
from flask_multiprocess_controller import MetaMPResource  # noqa: E402

install_write_counter()  # with BENCH_WRITE_LOG set: count the store's write transactions (before any fork)
controller = from_environment()
app = Flask(__name__)
Api(app).add_resource(MetaMPResource, "/tasks", "/tasks/<string:uuid>", resource_class_args=(controller,))

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ["PORT"]), threaded=True)
