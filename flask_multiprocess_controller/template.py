"""Class factories for the minimal-effort setup of the seed."""
from __future__ import annotations

import uuid
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
        """A resource class; without a name it gets a unique one, so that several can be mounted in one app.

        flask-restful derives a resource's endpoint from its class name, and two
        resources with the same endpoint cannot share an app.
        """
        return type(name or f"MPResource_{uuid.uuid4().hex}", (MetaMPResource,), {})
