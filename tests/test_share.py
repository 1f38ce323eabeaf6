"""Share links over HTTP: a valid link shows its one task (JSON, events, page), an expired, altered or
another task's link shows nothing, and the links are made only when the app can sign them. The page in a
real browser is tested in test_dashboard_browser.py."""
from __future__ import annotations

import os
import time
import uuid as uuid_module
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask, abort, request
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.exceptions import ShareLinksUnavailable
from flask_multiprocess_controller.http import share


pytestmark = pytest.mark.timeout(60)


class Gate(MetaMPTask):
    """Publishes ``text`` as its progress, waits for the file ``gate`` (checking for stops), returns ``text``."""

    def execute(self, text: str = "", gate: str = "") -> str:
        self.upload_status(text)
        while gate and not os.path.exists(gate):
            self.checkpoint()
            time.sleep(0.01)
        return text


@pytest.fixture
def controller():
    made = MetaMPController(Gate, store="memory://", max_num_process=2, stop_grace=0.5)
    yield made
    made.shutdown()


def make_app(controller: MetaMPController, secret: Any = "a long random secret", **extension: Any) -> Flask:
    app = Flask(__name__)
    if secret is not None:
        app.config["SECRET_KEY"] = secret
    app.config["MPC_MAX_WAIT"] = 10
    resource = type(f"R{uuid_module.uuid4().hex}", (MetaMPResource,), {})
    Api(app).add_resource(resource, "/gate", "/gate/<string:uuid>", resource_class_args=(controller,))
    MultiprocessController(app, **extension)
    return app


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_a_link_shows_its_task_only_and_refuses_missing_altered_expired_and_other_tokens(controller, tmp_path,
                                                                                          monkeypatch):
    # The operator's API is behind a login and a tenant hook; share links are not: their token is the authority.
    def login(view: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if request.headers.get("X-User") != "operator":
                abort(401)
            return view(*args, **kwargs)
        guarded.__name__ = view.__name__
        return guarded

    controller.tenant = lambda: request.headers.get("X-User")
    app = make_app(controller, decorator=login)
    client = app.test_client()
    gate = tmp_path / "gate"
    answer = client.post("/gate?share=600", json={"text": "half way", "gate": str(gate)},
                         headers={"X-User": "alice"})
    assert answer.status_code == 202, answer.get_json()
    mine = answer.get_json()
    other = client.post("/gate", json={"text": "not yours"}, headers={"X-User": "bob"}).get_json()
    link = path_of(mine["share_url"])
    assert link.startswith(f"/mpc/share/{mine['uuid']}?token=")
    assert client.get(f"/mpc/api/tasks/{mine['uuid']}").status_code == 401, "the operator's API stays closed"

    shown = client.get(link)  # no login, no tenant
    assert shown.status_code == 200 and shown.headers["Cache-Control"] == "no-store"
    task = shown.get_json()
    assert task["uuid"] == mine["uuid"] and task["status"] in ("queued", "running")
    assert set(task) <= set(share.SHARED_KEYS), "never the arguments, the process, the host or the tenant"

    gate.touch()
    controller.wait(mine["uuid"], 20)
    ended = client.get(link).get_json()
    assert (ended["status"], ended["result"], ended["progress"]) == ("succeeded", "half way", "half way")

    token = link.split("token=")[1]
    missing = client.get(link.split("?")[0])
    assert missing.status_code == 401 and "token" in missing.get_json()["message"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(link.split("?")[0], headers={"Authorization": f"Bearer {token}"}).status_code == 200

    payload, signature = token.rsplit(".", 1)
    altered = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    for bad in (f"{payload}.{altered}", f"{payload}x.{signature}", "garbage"):
        refused = client.get(f"/mpc/share/{mine['uuid']}?token={bad}")
        assert refused.status_code == 403, bad
        assert "half way" not in refused.get_data(as_text=True)

    # The token of one task opens none other, whatever the URL asks for.
    for url in (f"/mpc/share/{other['uuid']}?token={token}", f"/mpc/share/{other['uuid']}/events?token={token}",
                f"/mpc/share/{other['uuid']}/artifacts/result.txt?token={token}"):
        refused = client.get(url)
        assert refused.status_code == 403, url
        assert "another task" in refused.get_json()["message"]
        assert "not yours" not in refused.get_data(as_text=True)

    # A link signed with another key (another app) opens nothing here.
    foreign = make_app(controller, secret="another app's secret")
    with foreign.test_request_context():
        stranger = share.make_token(foreign, mine["uuid"], 600)
    assert client.get(f"/mpc/share/{mine['uuid']}?token={stranger}").status_code == 403

    # Past its validity, the link is refused with 401 (ask for a new one), its events too.
    with app.test_request_context(headers={"X-User": "alice"}):  # the tenant's own task: it may share it
        short = path_of(controller.share_url(mine["uuid"], ttl=5))
    assert client.get(short).status_code == 200

    class Later:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            return time.time() + 6

    monkeypatch.setattr(share, "time", Later)
    for url in (short, short.replace("?", "/events?")):
        expired = client.get(url)
        assert expired.status_code == 401, url
        assert "expired" in expired.get_json()["message"]
    assert client.get(link).status_code == 200, "a longer link still opens"


def test_events_follow_the_one_task_until_it_ends(controller, tmp_path):
    app = make_app(controller)
    client = app.test_client()
    gate = tmp_path / "gate"
    mine = client.post("/gate?share=60", json={"text": "mine", "gate": str(gate)}).get_json()
    others = client.post("/gate", json={"text": "someone else's", "gate": str(gate)}).get_json()
    with client.get(path_of(mine["share_url"]).replace("?", "/events?"), buffered=False) as stream:
        assert stream.mimetype == "text/event-stream"
        chunks = stream.iter_encoded()
        seen = ""
        while "event: task" not in seen:
            seen += next(chunks).decode()
        gate.touch()  # both tasks end: the stream shows the end of its task, then ends
        seen += b"".join(chunks).decode()
    assert seen.count("event: task") == 1 and seen.rstrip().endswith("}")
    assert '"status": "succeeded"' in seen.split("event: task", 1)[1], "the end comes live, and ends the stream"
    assert "someone else's" not in seen and others["uuid"] not in seen
    assert '"args"' not in seen and '"pid"' not in seen


def test_links_need_a_secret_key_and_a_valid_validity_and_refusals_queue_nothing(controller):
    unsigned = make_app(controller, secret=None).test_client()
    refused = unsigned.post("/gate?share=60", json={"text": "x"})
    assert refused.status_code == 400 and "SECRET_KEY" in refused.get_json()["message"]
    signed = make_app(controller).test_client()
    for bad in ("0", "-5", "abc", str(31 * 24 * 3600)):
        assert signed.post(f"/gate?share={bad}", json={"text": "x"}).status_code == 400, bad
    assert controller.tasks()["tasks"] == [], "a refused POST queues nothing"
    uuid = controller.submit(text="x")
    with pytest.raises(ShareLinksUnavailable):
        controller.share_url(uuid)  # outside the app
    bulk = signed.post("/gate?share=60", json=[{"text": "a"}, {"text": "b"}]).get_json()
    assert all("/mpc/share/" in task["share_url"] for task in bulk["tasks"])


def test_the_page_and_its_files_are_served_with_the_policy_and_no_login(controller):
    def login(view: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            abort(401)
        guarded.__name__ = view.__name__
        return guarded

    app = make_app(controller, decorator=login)
    client = app.test_client()
    with app.test_request_context():
        link = path_of(controller.share_url(controller.submit(text="x"), ttl=60))
    page = client.get(link, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.mimetype == "text/html" and "Accept" in page.vary
    assert b"<mpc-progress" in page.data and b"<script src=\"../mpc-progress.js\"" in page.data
    assert client.get(link, headers={"Accept": "*/*"}).mimetype == "application/json"
    for url in (link, "/mpc/mpc-progress.js", "/mpc/share.css"):
        answer = client.get(url)
        assert answer.status_code == 200, url
        policy = answer.headers["Content-Security-Policy"]
        assert "frame-ancestors 'self'" in policy and "script-src 'self'" in policy and "unsafe" not in policy
    script = client.get("/mpc/mpc-progress.js").get_data(as_text=True)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


class Report(MetaMPTask):
    """Saves a small report as its artifact."""

    def execute(self) -> str:
        self.save_artifact("report.txt", b"0123456789", content_type="text/plain")
        return "done"


def test_a_link_downloads_its_tasks_artifacts_with_ranges_and_no_other(tmp_path):
    reports = MetaMPController(Report, store="memory://", artifacts_url=str(tmp_path / "files"))
    try:
        app = make_app(reports)
        client = app.test_client()
        with app.test_request_context():
            first, second = reports.submit(), reports.submit()
            assert reports.wait(first, timeout=30)["status"] == "succeeded"
            assert reports.wait(second, timeout=30)["status"] == "succeeded"
            token = urlsplit(reports.share_url(first)).query
        with client.get(f"/mpc/share/{first}/artifacts/report.txt?{token}") as whole:
            assert whole.status_code == 200 and whole.data == b"0123456789"
            assert "attachment" in whole.headers["Content-Disposition"]
        with client.get(f"/mpc/share/{first}/artifacts/report.txt?{token}", headers={"Range": "bytes=2-4"}) as part:
            assert part.status_code == 206 and part.data == b"234"
        assert client.get(f"/mpc/share/{first}/artifacts/missing.txt?{token}").status_code == 404
        assert client.get(f"/mpc/share/{first}/artifacts/..%2Freport.txt?{token}").status_code in (400, 404)
        assert client.get(f"/mpc/share/{second}/artifacts/report.txt?{token}").status_code == 403
    finally:
        reports.shutdown()
