"""Upstream 0.1's module path of the log configurators: ``flask_multiprocess_controller.logger``.

They live in :mod:`.logs`; this module only names them where 0.1 code imports them from.
"""
from __future__ import annotations

from .engine.logs import DefaultMPLoggerConfigurator, MetaMPLoggerConfigurator

__all__ = ["MetaMPLoggerConfigurator", "DefaultMPLoggerConfigurator"]
