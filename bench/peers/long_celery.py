"""The Celery peer of ``bench/long_tasks.py``: the same long task reporting progress with Celery's
documented ``update_state``, and a Flask app that queues it and reads it back through ``AsyncResult``
the way Celery's own users write it (``state`` then ``info``).

Worker: ``celery -A bench.peers.long_celery worker --concurrency 16``; web tier:
``gunicorn bench.peers.long_celery:web``. Both find Redis (broker and result backend) through
``BENCH_CELERY_URL``. ``task_track_started`` is on, so that a running task is not reported ``PENDING``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from celery import Celery  # noqa: E402
from celery.result import AsyncResult  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402

from bench.peers.long_task_body import progress_value, steps  # noqa: E402

URL_ENV = "BENCH_CELERY_URL"

celery = Celery("bench-long")
celery.conf.task_track_started = True
if os.environ.get(URL_ENV):
    celery.conf.update(broker_url=os.environ[URL_ENV], result_backend=os.environ[URL_ENV])


@celery.task(bind=True)
def long(self, seconds: float = 30.0, rate: float = 10.0) -> int:
    """The same task as this project's: ``update_state`` ``rate`` times a second for ``seconds``."""
    count = 0
    for i in steps(seconds, rate):
        self.update_state(state="PROGRESS", meta=progress_value(i))
        count = i
    return count


web = Flask(__name__)


@web.post("/tasks")
def submit():
    args = request.get_json(force=True) or {}
    return jsonify(uuid=long.delay(**args).id), 202


@web.get("/tasks/<uuid>")
def status(uuid: str):
    result = AsyncResult(uuid, app=celery)
    state = result.state
    info = result.info
    progress = info if state == "PROGRESS" else None
    return jsonify(uuid=uuid, status=state, progress=progress,
                   result=info if state == "SUCCESS" else None)
