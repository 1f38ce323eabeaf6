"""Class factories for the minimal-effort setup of the seed, and the template classes of 0.1's docs.

Upstream 0.1.1's package description still shows ``TemplateMPController`` and
``TemplateMPResource`` (the classes of its pre-0.1 releases, which the factory
replaced); they are kept here as ready-made subclasses, so code written from either
keeps working.
"""
from __future__ import annotations

import uuid
from typing import Optional

from .controller import MetaMPController
from .http.resource import MetaMPResource


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


class TemplateMPController(MetaMPController):
    """A ready-to-use controller class, named after the task class of each controller made from it.

    .. versionadded:: 0.3
    """

    _unnamed = True
    _name = None


class TemplateMPResource(MetaMPResource):
    """A ready-to-use resource class. Its endpoint is its class name, so one app mounts it once;
    use :meth:`TemplateFactory.MPResource` for several.

    .. versionadded:: 0.3
    """
