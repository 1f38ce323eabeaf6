"""Calling the store from a background thread: an outage is waited out, never fatal.

A controlling thread or the keeper that meets a :class:`~.exceptions.StoreError` must
not die of it (the process would never run a task again), nor fill the log with one
traceback per attempt. :class:`Retrier` logs the first failure and the recovery once
each and retries with a capped, growing pause.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional, TypeVar

from .. import defaults
from ..exceptions import StoreError

T = TypeVar("T")


class GaveUp(Exception):
    """The retrying was stopped (the runtime is closing) before the store answered."""


class Retrier:
    """Retries store calls of one background thread through outages.

    :param stop: set when the thread must give up waiting (shutdown).
    """

    def __init__(self, logger: logging.Logger, stop: threading.Event,
                 first_pause: float = defaults.STORE_RETRY_MIN, max_pause: float = defaults.STORE_RETRY_MAX) -> None:
        self._logger = logger
        self._stop = stop
        self._first_pause = first_pause
        self._max_pause = max_pause
        #: What failed and has not recovered yet, for a single recovery line.
        self.failing: Optional[str] = None

    def call(self, what: str, action: Callable[[], T], give_up_at_stop: bool = True) -> T:
        """Run ``action`` until it does not raise :class:`StoreError`.

        :raises GaveUp: ``stop`` was set (and ``give_up_at_stop``) while the store was failing.
        """
        pause = self._first_pause
        while True:
            try:
                result = action()
            except StoreError as exc:
                if self.failing is None:
                    self._logger.warning("The task store failed (%s): %s; retrying until it is back.", what, exc)
                    self.failing = what
                if give_up_at_stop and self._stop.is_set():
                    raise GaveUp(what) from exc
                self._stop.wait(pause)
                pause = min(pause * 2, self._max_pause)
                continue
            if self.failing is not None:
                self._logger.warning("The task store is back (%s works again).", what)
                self.failing = None
            return result
