"""The model repository: versions with stages and aliases, and their artifacts by sha256."""

from llm_ops_helper.controller.registry.errors import (
    ChecksumMismatch,
    Conflict,
    DiskFull,
    Invalid,
    NotFound,
    RegistryError,
    StorageError,
    TooLarge,
)
from llm_ops_helper.controller.registry.records import (
    Artifact,
    LineageEvent,
    ModelSummary,
    NewVersion,
    Version,
)
from llm_ops_helper.controller.registry.registry import Registry

__all__ = ["Artifact", "ChecksumMismatch", "Conflict", "DiskFull", "Invalid", "LineageEvent",
           "ModelSummary", "NewVersion", "NotFound", "Registry", "RegistryError",
           "StorageError", "TooLarge", "Version"]
