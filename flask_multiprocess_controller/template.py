"""Class factories for the minimal-effort setup of the seed."""
from __future__ import annotations

from typing import Optional

from .controller import MetaMPController
from .resource import MetaMPResource


class TemplateFactory:
    """Makes ready-to-use subclasses of :class:`MetaMPController` and :class:`MetaMPResource`."""

    @staticmethod
    def MPController(name: Optional[str] = None) -> type[MetaMPController]:
        """A controller class named ``name``; without a name the controller is named after its task class.

        The name is the controller's identity in the store, so it is kept stable
        across restarts (never random), and queued tasks survive them.
        """
        if name:
            return type(name, (MetaMPController,), {}, controller_name=name)
        return type("MPController", (MetaMPController,), {"_unnamed": True, "_name": None})

    @staticmethod
    def MPResource(name: Optional[str] = None) -> type[MetaMPResource]:
        """A resource class (each mount of it gets its own endpoint name from flask-restful)."""
        return type(name or "MPResource", (MetaMPResource,), {})
