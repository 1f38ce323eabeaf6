"""Serve the two APIs of this directory from one app, the 0.1 tutorial's way.

    python example_server.py                                    # the dev server on 127.0.0.1:8050
    gunicorn -b 127.0.0.1:8050 'example_server:create_app()'   # gunicorn, from this directory

Set ``PORT`` to serve another port (the callback URL follows it). Then::

    curl -s -X POST -H 'Content-Type: application/json' -d '{"steps": 5}' http://127.0.0.1:8050/main
    curl -s 'http://127.0.0.1:8050/main?uuid=<uuid>'
    curl -s -X DELETE 'http://127.0.0.1:8050/main?uuid=<uuid>'
"""
import os

import flask


def create_app() -> flask.Flask:
    # Imported here, as in the tutorial: the module that creates the controllers is only
    # imported by the process that serves.
    from example_local_callback_api import local_callback_api
    from example_main_api import main_api

    app = flask.Flask(__name__)
    main_api.init_app(app)
    local_callback_api.init_app(app)
    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=int(os.environ.get("PORT", "8050")))
