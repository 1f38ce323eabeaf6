"""Store classes named by ``module.path:ClassName`` store URLs in the tests (tests/test_store_url.py)."""
from __future__ import annotations

from typing import Optional

from flask_multiprocess_controller.store import MemoryStore


class LabelledStore(MemoryStore):
    """A memory store that keeps what its URL gave it."""

    def __init__(self, url: Optional[str] = None, label: str = "", **options: str) -> None:
        super().__init__()
        self.url = url
        self.label = label
        self.options = options


class Strict(MemoryStore):
    """A memory store taking no arguments at all."""


class Outer:
    """Holds a store class, for a dotted name after the colon."""

    class Inner(MemoryStore):
        """A memory store nested in a class."""


class NotAStore:
    """Not a TaskStore subclass."""


not_a_class = LabelledStore()
