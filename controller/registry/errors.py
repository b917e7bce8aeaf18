"""The registry's one exception family; each kind carries the HTTP status the API answers."""

from __future__ import annotations


class RegistryError(Exception):
    """Something the registry refuses or cannot do; the message names the cause."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(RegistryError):
    """A bad name, reference, parameter or body."""

    status = 400


class ChecksumMismatch(Invalid):
    """The upload's sha256 is not the one the client announced; nothing was stored."""


class NotFound(RegistryError):
    status = 404


class Conflict(RegistryError):
    """Legal input the current state refuses: an illegal stage move, an in-use version."""

    status = 409


class TooLarge(RegistryError):
    status = 413


class DiskFull(RegistryError):
    status = 507


class StorageError(RegistryError):
    """The database or the blob directory failed underneath (I/O, corruption)."""

    status = 500
