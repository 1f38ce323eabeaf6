"""Run heavy Python work in child processes behind a flask-restful resource."""
from __future__ import annotations

from .controller import MetaMPController
from .exceptions import (
    AbortException, ControllerClosed, InvalidArguments, InvalidRequest, InvalidTransition, MemoryLimitExceeded,
    MethodNotServed, MPCError, NoTargetTask, PayloadTooLarge, ProcessDied, QueueFull, StateTooLarge,
    StoreError, TaskAlreadyFinished, TaskFailure, TaskNotFound, TaskTimeout,
)
from .exceptions import ChangeNotAllowed
from .exceptions import TaskStillActive
from .exceptions import ArtifactNotFound, ArtifactTooLarge, InvalidArtifactName, TooManyArtifacts
from .exceptions import FinishRequested
from .extension import MultiprocessController
from .engine.logs import DefaultMPLoggerConfigurator, MetaMPLoggerConfigurator
from .http.resource import MetaMPResource
from .http.responses import Reply
from .states import TaskStatus
from .store import MemoryStore, SQLiteStore, TaskStore
from .store.base import ANY_TENANT as ALL_TENANTS, SYSTEM_TENANT
from .task import MetaMPTask, set_checkpoint, upload_status
from .template import TemplateFactory, TemplateMPController, TemplateMPResource

__version__ = "0.2.0"

__all__ = [
    "ALL_TENANTS", "SYSTEM_TENANT",
    "MetaMPTask", "MetaMPController", "MetaMPResource", "TemplateFactory", "upload_status", "set_checkpoint",
    "AbortException", "MetaMPLoggerConfigurator", "DefaultMPLoggerConfigurator", "TaskStatus", "TaskStore",
    "MemoryStore", "SQLiteStore", "MPCError", "InvalidRequest", "InvalidArguments", "PayloadTooLarge",
    "TaskNotFound", "TaskAlreadyFinished", "QueueFull", "ControllerClosed", "StoreError", "MethodNotServed",
    "NoTargetTask", "Reply", "TemplateMPController", "TemplateMPResource", "MultiprocessController",
    "InvalidTransition", "TaskFailure", "ProcessDied", "TaskTimeout", "MemoryLimitExceeded",
    "StateTooLarge", "ChangeNotAllowed",
    "TaskStillActive",
    "ArtifactNotFound", "ArtifactTooLarge", "InvalidArtifactName", "TooManyArtifacts",
    "FinishRequested",
]
