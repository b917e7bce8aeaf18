"""The deployment engine's one exception family; each kind carries the HTTP status it maps to."""

from __future__ import annotations


class DeploymentError(Exception):
    """Something the engine refuses; the message names the cause."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(DeploymentError):
    """A bad spec, name or argument, or a deployment that no host could ever run."""

    status = 400


class NotFound(DeploymentError):
    status = 404


class Conflict(DeploymentError):
    """Legal input the current state refuses (a deployment being deleted)."""

    status = 409
