"""Tenants: each user sees and stops only the tasks they queued, on the resource and on /mpc/.

Flask-HTTPAuth checks the user; the controller's ``tenant=`` hook names the tenant of each request,
and the extension's ``decorator=`` puts the same check in front of the operator URLs.

Run it with ``python examples/tenants_app.py`` (http://127.0.0.1:5000), then, for example::

    curl -s -u alice:alice-secret -X POST -H 'Content-Type: application/json' -d '{"rows": 3}' \\
        http://127.0.0.1:5000/reports
    curl -s -u bob:bob-secret http://127.0.0.1:5000/reports        # bob sees none of alice's tasks
"""
import time

from flask import Flask
from flask_httpauth import HTTPBasicAuth
from flask_restful import Api
from werkzeug.security import check_password_hash, generate_password_hash

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController

auth = HTTPBasicAuth()
USERS = {name: generate_password_hash(f"{name}-secret") for name in ("alice", "bob")}


@auth.verify_password
def verify_password(username: str, password: str):
    if username in USERS and check_password_hash(USERS[username], password):
        return username
    return None


class Report(MetaMPTask):
    """Build a report of ``rows`` rows."""

    def execute(self, rows: int = 10, pause: float = 0.05) -> dict:
        for _ in self.track(range(rows)):
            time.sleep(pause)
        return {"rows": rows}


class Reports(MetaMPController, controller_name="reports", decorator=auth.login_required):
    pass


mpc = MultiprocessController(decorator=auth.login_required)
reports = Reports(Report, max_num_process=2, tenant=lambda: auth.current_user())


def create_app() -> Flask:
    app = Flask(__name__)
    Api(app).add_resource(MetaMPResource, "/reports", "/reports/<string:uuid>", resource_class_args=(reports,))
    mpc.init_app(app)
    return app


app = create_app()

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
