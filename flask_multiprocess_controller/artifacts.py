"""Artifacts: the files a task produces, kept with the task and served over HTTP.

A task saves a file with ``self.save_artifact(name, data_or_path)``, or leaves it in ``self.artifact_dir``
(a private scratch directory of the attempt: what is left there when ``execute`` ends is saved under its
file name). Each artifact is described by a small record, ``{"name", "size", "content_type", "sha256"}``;
the task object lists them in ``artifacts`` once the attempt ended, and ``GET <item>/artifacts`` lists
them at any time (they are read from where they are kept, so a running task's are listed as it saves them).

Where they are kept is a directory: ``MPC_ARTIFACTS_URL`` (a path, or a ``file://`` URL), by default
``<instance folder>/mpc-artifacts``. Each controller keeps its tasks' files under a folder of its own
name, one folder per task. A directory on the local disk serves one host; for several hosts, name a
directory all of them mount (NFS, a cloud file share): a task's artifacts are then readable from every
host. One directory per store: a purge removes the folders of the tasks its store no longer has.

Layout of a controller's folder::

    <task uuid>/<name>              the file
    <task uuid>/.meta/<name>.json   its record (written after the file: a listed artifact is complete)
    <task uuid>/.tmp-*              a save in progress

The read API other parts of the package call (the resource, the operator URLs, share links):
:func:`list_artifacts`, :func:`open_artifact` and :func:`artifact_response`, each given a controller and
a task's stored row (whose visibility the caller checked).

.. versionadded:: 0.4
"""
from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
import builtins
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, Optional, TypedDict, Union
from urllib.parse import quote, unquote, urlsplit

from . import defaults
from .exceptions import ArtifactNotFound, ArtifactTooLarge, InvalidArtifactName, TooManyArtifacts

if TYPE_CHECKING:
    from flask import Response

    from .controller import MetaMPController
    from .engine.protocol import Limits

__all__ = [
    "ArtifactInfo", "ArtifactStorage", "ArtifactWriter", "check_name", "storage_root", "list_artifacts",
    "open_artifact", "artifact_response", "sweep",
]

_LOGGER = logging.getLogger(__name__)
#: The longest artifact name, in bytes of UTF-8 (what common file systems take).
MAX_NAME_BYTES = 255
#: The bytes read and written at a time while copying and hashing.
_CHUNK = 1024 * 1024
_META = ".meta"
_TASK_DIR = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class ArtifactInfo(TypedDict):
    """What the task object and ``GET <item>/artifacts`` say of one artifact."""

    name: str
    #: Bytes.
    size: int
    content_type: str
    #: Hex SHA-256 of the content.
    sha256: str


def check_name(name: Any) -> str:
    """``name`` when it is a safe artifact name: one path component, no leading dot, no control
    character, at most :data:`MAX_NAME_BYTES` bytes of UTF-8.

    :raises InvalidArtifactName: otherwise (what leads out of the task's folder among them: ``..``, ``a/b``).
    """
    if not isinstance(name, str) or not name:
        raise InvalidArtifactName(f"An artifact name must be a non-empty string, not {name!r}."[:200])
    shown = repr(name[:80])
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidArtifactName(f"{shown} is not a valid artifact name: a name is one file name, without "
                                  f"'/' or '\\' (no path).")
    if name.startswith("."):
        raise InvalidArtifactName(f"{shown} is not a valid artifact name: it may not begin with a dot.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArtifactName(f"{shown} is not a valid artifact name: it holds a control character.")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArtifactName(f"{shown} is not a valid artifact name: it is not valid Unicode.") from None
    if size > MAX_NAME_BYTES:
        raise InvalidArtifactName(f"{shown} is not a valid artifact name: it takes {size} bytes, over "
                                  f"{MAX_NAME_BYTES}.")
    return name


def _check_uuid(uuid: str) -> str:
    if not isinstance(uuid, str) or _TASK_DIR.fullmatch(uuid) is None:
        raise ValueError(f"{uuid!r} is not a task uuid.")
    return uuid


def _directory(url: str) -> str:
    """The directory an ``MPC_ARTIFACTS_URL`` names: a path, or a ``file://`` URL."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"MPC_ARTIFACTS_URL {url!r} names a host: a file:// URL names a local directory "
                             f"(file:///path), which every host mounts.")
        return unquote(parts.path)
    if parts.scheme and len(parts.scheme) > 1:  # not a Windows drive letter
        raise ValueError(f"MPC_ARTIFACTS_URL {url!r} is neither a directory nor a file:// URL.")
    return url


def storage_root(url: Optional[str], instance_path: Optional[str]) -> str:
    """The absolute directory artifacts are kept in: ``url`` (a path, relative ones to ``instance_path``, or
    a ``file://`` URL), else ``<instance_path>/mpc-artifacts`` (``instance_path`` None: ``./instance``).

    :raises ValueError: a URL of another kind.
    """
    base = instance_path or os.path.abspath("instance")
    if not url:
        return os.path.join(base, defaults.ARTIFACTS_DIR)
    return os.path.join(base, os.path.expanduser(_directory(url)))


def controller_folder(root: str, controller: str) -> str:
    """The folder of ``controller``'s tasks under ``root`` (its name quoted into one path component)."""
    return os.path.join(root, quote(controller, safe="") or "_")


class ArtifactStorage:
    """The artifacts of one controller's tasks, in a directory (see the module's layout)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _task_dir(self, uuid: str) -> str:
        return os.path.join(self.directory, _check_uuid(uuid))

    def list(self, uuid: str) -> Optional[list[ArtifactInfo]]:
        """The artifacts of task ``uuid``, by name; None when it never saved one."""
        meta_dir = os.path.join(self._task_dir(uuid), _META)
        try:
            entries = sorted(os.listdir(meta_dir))
        except FileNotFoundError:
            return None
        found: list[ArtifactInfo] = []
        for entry in entries:
            if not entry.endswith(".json"):
                continue
            info = self._read_meta(os.path.join(meta_dir, entry))
            if info is not None:
                found.append(info)
        return found

    @staticmethod
    def _read_meta(path: str) -> Optional[ArtifactInfo]:
        try:
            with open(path, encoding="utf-8") as meta:
                data = json.load(meta)
        except (OSError, ValueError):  # removed meanwhile (a purge), or not one of ours
            return None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None
        return ArtifactInfo(name=data["name"], size=int(data.get("size", 0)),
                            content_type=str(data.get("content_type") or "application/octet-stream"),
                            sha256=str(data.get("sha256", "")))

    def info(self, uuid: str, name: str) -> ArtifactInfo:
        """The record of artifact ``name`` of task ``uuid``.

        :raises InvalidArtifactName: a name no artifact can have.
        :raises ArtifactNotFound: the task has no such artifact.
        """
        check_name(name)
        info = self._read_meta(os.path.join(self._task_dir(uuid), _META, name + ".json"))
        if info is None or info["name"] != name or not os.path.isfile(self.path(uuid, name)):
            raise ArtifactNotFound(uuid, name)
        return info

    def path(self, uuid: str, name: str) -> str:
        """Where the content of artifact ``name`` of task ``uuid`` is (checked name; it may not exist)."""
        return os.path.join(self._task_dir(uuid), check_name(name))

    def save(self, uuid: str, name: str, source: Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", IO[bytes]],
             content_type: Optional[str], limits: "Limits") -> ArtifactInfo:
        """Save ``source`` (bytes, a path to a file, or a binary file object) as artifact ``name`` of task
        ``uuid``, replacing one of the same name; return its record.

        The content is copied and hashed in one pass into a temporary file beside its place, then moved
        there, then its record written: a reader sees the old artifact or the new one, never a part.

        :raises InvalidArtifactName: see :func:`check_name`.
        :raises ArtifactTooLarge: over ``limits.artifact_bytes`` (nothing saved).
        :raises TooManyArtifacts: the task holds ``limits.artifact_count`` others already.
        :raises TypeError: ``source`` is none of these.
        """
        check_name(name)
        task_dir = self._task_dir(uuid)
        meta_dir = os.path.join(task_dir, _META)
        if not os.path.exists(os.path.join(meta_dir, name + ".json")):
            held = self.list(uuid) or []
            if len(held) >= limits.artifact_count:
                raise TooManyArtifacts(name, limits.artifact_count)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = memoryview(source).cast("B")
            if data.nbytes > limits.artifact_bytes:
                raise ArtifactTooLarge(name, limits.artifact_bytes)
            return self._store(task_dir, name, content_type, limits, lambda write: write(data))
        if isinstance(source, (str, os.PathLike)):
            if os.path.getsize(source) > limits.artifact_bytes:
                raise ArtifactTooLarge(name, limits.artifact_bytes)
            with open(source, "rb") as opened:
                return self._store(task_dir, name, content_type, limits, _copier(opened))
        if hasattr(source, "read"):
            return self._store(task_dir, name, content_type, limits, _copier(source))
        raise TypeError(f"save_artifact() takes bytes, a path to a file or a binary file object, not "
                        f"{type(source).__name__}.")

    def _store(self, task_dir: str, name: str, content_type: Optional[str], limits: "Limits",
               copy: Callable[[Callable[[Any], None]], None]) -> ArtifactInfo:
        os.makedirs(os.path.join(task_dir, _META), exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, temporary = tempfile.mkstemp(prefix=".tmp-", dir=task_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                def write(chunk: Any) -> None:
                    nonlocal size
                    size += len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
                    if size > limits.artifact_bytes:
                        raise ArtifactTooLarge(name, limits.artifact_bytes)
                    digest.update(chunk)
                    out.write(chunk)

                copy(write)
            info = ArtifactInfo(name=name, size=size, sha256=digest.hexdigest(),
                                content_type=content_type or mimetypes.guess_type(name)[0]
                                or "application/octet-stream")
            os.replace(temporary, os.path.join(task_dir, name))
        except BaseException:
            _remove(temporary)
            raise
        fd, meta_temporary = tempfile.mkstemp(prefix=".tmp-", dir=task_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as meta:
            json.dump(info, meta)
        os.replace(meta_temporary, os.path.join(task_dir, _META, name + ".json"))
        return info

    def remove(self, uuid: str) -> None:
        """Delete every artifact of task ``uuid``."""
        shutil.rmtree(self._task_dir(uuid), ignore_errors=True)

    def task_uuids(self) -> "builtins.list[str]":
        """The uuids of the tasks that have a folder here."""
        try:
            return [entry for entry in os.listdir(self.directory) if _TASK_DIR.fullmatch(entry)]
        except FileNotFoundError:
            return []


def _copier(source: IO[bytes]) -> Callable[[Callable[[Any], None]], None]:
    def copy(write: Callable[[Any], None]) -> None:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                return
            write(chunk)

    return copy


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- in the task process ------------------------------------------------------------------------------------


class ArtifactWriter:
    """A running task's artifacts: its scratch directory and its saves (made by the task process per attempt)."""

    def __init__(self, uuid: str, limits: "Limits", logger: logging.Logger = _LOGGER) -> None:
        self.uuid = uuid
        self.limits = limits
        self.storage = ArtifactStorage(limits.artifacts_url)
        self.logger = logger
        self._scratch: Optional[str] = None

    @property
    def directory(self) -> str:
        """The attempt's private scratch directory, made at the first use."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix=f"mpc-artifacts-{self.uuid[:8]}-")
        return self._scratch

    def save(self, name: str, data_or_path: Any, content_type: Optional[str] = None) -> ArtifactInfo:
        """See :meth:`~.task.MetaMPTask.save_artifact`."""
        return self.storage.save(self.uuid, name, data_or_path, content_type, self.limits)

    def finish(self) -> Optional[list[ArtifactInfo]]:
        """Save what is left in the scratch directory, remove it, and return the task's artifacts (None
        when it has none and saved none)."""
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            try:
                for entry in sorted(os.listdir(scratch)):
                    path = os.path.join(scratch, entry)
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    try:
                        self.save(entry, path)
                    except Exception as exc:  # the task's outcome stands; the file is lost, said so
                        self.logger.warning("File %r left in the artifact_dir of task %s was not saved: %s",
                                            entry, self.uuid, exc)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        try:
            return self.storage.list(self.uuid)
        except OSError as exc:
            self.logger.warning("The artifacts of task %s cannot be listed: %s", self.uuid, exc)
            return None


# -- the read API (serving processes) -------------------------------------------------------------------------


def storage_of(controller: "MetaMPController") -> ArtifactStorage:
    """Where ``controller``'s tasks keep their artifacts."""
    return ArtifactStorage(controller.limits.artifacts_url)


def list_artifacts(controller: "MetaMPController", row: Mapping[str, Any]) -> list[ArtifactInfo]:
    """The artifacts of the task of ``row`` (a stored row of ``controller``'s, visible to the caller), as
    kept now (a running task's too); empty when it has none."""
    return storage_of(controller).list(str(row["uuid"])) or []


@dataclass(frozen=True)
class OpenedArtifact:
    """One artifact found: its record and the file holding it."""

    info: ArtifactInfo
    path: str


def open_artifact(controller: "MetaMPController", row: Mapping[str, Any], name: str) -> OpenedArtifact:
    """Artifact ``name`` of the task of ``row`` (a stored row of ``controller``'s, visible to the caller).

    :raises InvalidArtifactName: a name no artifact can have (400).
    :raises ArtifactNotFound: the task has no such artifact (404).
    """
    storage = storage_of(controller)
    uuid = str(row["uuid"])
    info = storage.info(uuid, name)
    return OpenedArtifact(info, storage.path(uuid, name))


def artifact_response(controller: "MetaMPController", row: Mapping[str, Any], name: str) -> "Response":
    """The HTTP download of artifact ``name`` of the task of ``row``: streamed from its file, as an attachment
    (``Content-Disposition``) of its content type, with ``ETag`` (its SHA-256), ``Last-Modified`` and
    range requests (206) answered; never served inline, so a browser does not render what a task wrote.

    :raises InvalidArtifactName: a name no artifact can have (400).
    :raises ArtifactNotFound: the task has no such artifact (404).
    """
    from flask import send_file

    opened = open_artifact(controller, row, name)
    response = send_file(opened.path, mimetype=opened.info["content_type"], as_attachment=True,
                         download_name=opened.info["name"], conditional=True, etag=opened.info["sha256"] or True,
                         max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def sweep(storage: ArtifactStorage, store: Any) -> int:
    """Delete the artifacts of the tasks ``store`` no longer has (purged) from ``storage``; return how many
    tasks' folders went. Called after each purge (the retention's and ``flask mpc purge``)."""
    removed = 0
    for uuid in storage.task_uuids():
        if store.get(uuid) is None:
            storage.remove(uuid)
            removed += 1
    return removed
