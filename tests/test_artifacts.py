"""Artifacts: the files a task saves, listed and downloaded through another app on the same store.

One real task process on a SQLite store saves artifacts (bytes, a file's path, a file left in
``artifact_dir``) and meets the name, size and count limits; a second Flask app on the same store and
the same artifacts directory (a ``role="client"`` controller: it runs nothing) lists them, downloads them
(a range request too) through the resource and the operator URLs, hides them from another tenant, and
loses them when ``flask mpc purge`` deletes the task.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from flask import Flask, request
from flask_restful import Api

from flask_multiprocess_controller import MetaMPController, MetaMPResource, MetaMPTask, MultiprocessController
from flask_multiprocess_controller.artifacts import check_name
from flask_multiprocess_controller.exceptions import (
    ArtifactTooLarge, InvalidArtifactName, TooManyArtifacts,
)

BIG = b"x" * 5000


class Report(MetaMPTask):
    """Saves three artifacts and reports how the limits answered the saves it may not make."""

    def execute(self, source: str) -> Any:
        refused = []
        self.save_artifact("report.txt", b"hello artifacts\n")
        self.save_artifact("data.bin", source)  # a path: copied
        for name, data in (("../evil", b"no"), ("big.bin", BIG)):
            try:
                self.save_artifact(name, data)
            except (InvalidArtifactName, ArtifactTooLarge) as exc:
                refused.append(type(exc).__name__)
        with open(os.path.join(self.artifact_dir, "left.csv"), "w") as out:  # saved when execute ends
            out.write("a,b\n1,2\n")
        self.save_artifact("report.txt", b"hello artifacts, again\n")  # replaces: counts once
        return refused


def _tenant() -> Any:
    return request.headers.get("X-Tenant")


def _app(controller: MetaMPController, config: dict[str, Any]) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    MultiprocessController(app)
    Api(app).add_resource(MetaMPResource, *MetaMPResource.urls("/reports"), resource_class_args=(controller,))
    return app


def test_artifacts_are_saved_listed_downloaded_elsewhere_and_purged(tmp_path: Any) -> None:
    store = f"sqlite:///{tmp_path}/tasks.sqlite3"
    config = {"MPC_ARTIFACTS_URL": f"file://{tmp_path}/shared", "MPC_MAX_ARTIFACT_SIZE": 4096,
              "MPC_MAX_ARTIFACTS": 3}
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 4)
    runner = MetaMPController(Report, store=store, tenant=_tenant, stop_grace=0.5)
    reader = MetaMPController(Report, store=store, tenant=_tenant, role="client")
    try:
        running, serving = _app(runner, config).test_client(), _app(reader, config)
        reading = serving.test_client()
        posted = running.post("/reports", json={"source": str(source)}, headers={"X-Tenant": "a"})
        assert posted.status_code == 202, posted.json
        uuid = posted.json["uuid"]
        task = runner.wait(uuid, timeout=60)
        assert task["status"] == "succeeded", task
        # the traversal name and the size were refused in the task, which went on
        assert task["result"] == ["InvalidArtifactName", "ArtifactTooLarge"]

        shown = reading.get(f"/reports/{uuid}", headers={"X-Tenant": "a"}).json
        listed = reading.get(f"/reports/{uuid}/artifacts", headers={"X-Tenant": "a"})
        assert listed.status_code == 200, listed.json
        names = [a["name"] for a in listed.json["artifacts"]]
        assert names == ["data.bin", "left.csv", "report.txt"]
        assert shown["artifacts"] == listed.json["artifacts"]
        data = {a["name"]: a for a in listed.json["artifacts"]}
        assert data["data.bin"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert data["data.bin"]["size"] == 1024
        assert data["report.txt"]["content_type"] == "text/plain"

        whole = reading.get(f"/reports/{uuid}/artifacts/report.txt", headers={"X-Tenant": "a"})
        assert whole.status_code == 200 and whole.data == b"hello artifacts, again\n"
        assert whole.headers["Content-Disposition"] == "attachment; filename=report.txt"
        whole.close()
        part = reading.get(f"/reports/{uuid}/artifacts/data.bin", headers={"X-Tenant": "a", "Range": "bytes=256-259"})
        assert part.status_code == 206 and part.data == bytes([0, 1, 2, 3])
        assert part.headers["Content-Range"] == "bytes 256-259/1024"
        part.close()
        operator = reading.get(f"/mpc/api/tasks/{uuid}/artifacts/data.bin", headers={"X-Tenant": "a"})
        assert operator.status_code == 200 and operator.data == source.read_bytes()
        operator.close()

        for bad in ("..%2Fdata.bin", "sub/data.bin", ".meta", "%2E%2E"):
            refused = reading.get(f"/reports/{uuid}/artifacts/{bad}", headers={"X-Tenant": "a"})
            assert refused.status_code == 400, (bad, refused.json)
            assert "artifact name" in refused.json["message"]
        assert reading.get(f"/reports/{uuid}/artifacts/nothing.txt", headers={"X-Tenant": "a"}).status_code == 404
        assert reading.get(f"/reports/{uuid}/artifacts", headers={"X-Tenant": "b"}).status_code == 404
        assert reading.get(f"/mpc/api/tasks/{uuid}/artifacts/data.bin", headers={"X-Tenant": "b"}).status_code == 404

        assert reading.delete(f"/reports/{uuid}/artifacts", headers={"X-Tenant": "a"}).status_code == 405

        purged = serving.test_cli_runner().invoke(args=["mpc", "purge", "--older-than", "0"])
        assert purged.exit_code == 0, purged.output
        assert not os.path.exists(os.path.join(reader.artifacts_directory, uuid))
        assert reading.get(f"/reports/{uuid}/artifacts", headers={"X-Tenant": "a"}).status_code == 404
    finally:
        runner.shutdown()
        reader.shutdown()


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "a\\b", "/etc/passwd", ".hidden", "", "a\x00b",
                                  "x" * 256, "\ud800"])
def test_names_that_could_leave_the_task_folder_are_refused(name: str) -> None:
    with pytest.raises(InvalidArtifactName):
        check_name(name)


def test_the_count_limit_refuses_a_new_name_but_not_a_replacement(tmp_path: Any) -> None:
    from flask_multiprocess_controller.artifacts import ArtifactStorage
    from flask_multiprocess_controller.engine.protocol import Limits

    limits = Limits(1, 1, artifact_bytes=10, artifact_count=1, artifacts_url=str(tmp_path))
    storage, uuid = ArtifactStorage(str(tmp_path)), "0" * 8 + "-0000-0000-0000-" + "0" * 12
    storage.save(uuid, "one", b"1", None, limits)
    storage.save(uuid, "one", b"11", None, limits)
    with pytest.raises(TooManyArtifacts):
        storage.save(uuid, "two", b"2", None, limits)
    with pytest.raises(ArtifactTooLarge):
        storage.save(uuid, "one", b"x" * 11, None, limits)
    assert [(a["name"], a["size"]) for a in storage.list(uuid) or []] == [("one", 2)]
    assert sorted(os.listdir(os.path.join(tmp_path, uuid))) == [".meta", "one"]  # no temporary left
