"""Upstream 0.1's module path of the task helpers: ``flask_multiprocess_controller.utils``.

They live in :mod:`.task` and :mod:`.exceptions`. Unlike 0.1's, ``upload_status(status)``
and ``set_checkpoint()`` find the running task themselves: they take no lock, pipe or
event.
"""
from __future__ import annotations

from .exceptions import AbortException
from .task import set_checkpoint, upload_status

__all__ = ["AbortException", "upload_status", "set_checkpoint"]
