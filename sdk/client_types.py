"""What `LLMOpsHelper` returns and raises: typed views of the controller's JSON, one error family.

The structs mirror the controller API's JSON (issue 4 contract). Unknown fields are ignored and
fields a controller might leave out have defaults, so an older or newer controller still decodes.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

# The controller writes times as Unix seconds; an ISO string is accepted too.
Timestamp = float | str | None


class Artifact(msgspec.Struct, frozen=True):
    sha256: str
    size_bytes: int
    filename: str = ""


class ModelVersion(msgspec.Struct, frozen=True):
    """One version of a model in the registry (``ref`` is ``name@N``)."""

    model: str
    version: int
    ref: str
    stage: str = "registered"
    aliases: tuple[str, ...] = ()
    runtime: str | None = None
    format: str | None = None
    artifact: Artifact | None = None
    source_uri: str | None = None
    parameters: int | float | str | None = None
    quantization: str | None = None
    tags: dict[str, str] = {}
    description: str = ""
    created_by: str = ""
    created_at: Timestamp = None
    replaces: int | None = None
    stage_changed_at: Timestamp = None


class ModelSummary(msgspec.Struct, frozen=True):
    """One line of ``GET /api/v1/models``; ``versions`` counts them, ``latest`` is the newest."""

    name: str
    latest: int | None = None
    versions: int = 0
    aliases: dict[str, int] = {}
    created_at: Timestamp = None
    updated_at: Timestamp = None


class Model(msgspec.Struct, frozen=True):
    name: str
    aliases: dict[str, int] = {}
    versions: tuple[ModelVersion, ...] = ()


class AliasChange(msgspec.Struct, frozen=True):
    """An alias set (``version`` is where it points now) or deleted (``version`` None)."""

    alias: str
    version: int | None = None
    previous: int | None = None


class ArtifactDiff(msgspec.Struct, frozen=True):
    same: bool
    size_delta_bytes: int = 0


class ModelDiff(msgspec.Struct, frozen=True, rename={"from_": "from"}):
    """Two versions side by side; ``changes`` maps each differing field to ``[a, b]``."""

    from_: ModelVersion
    to: ModelVersion
    changes: dict[str, tuple[Any, Any]] = {}
    artifact: ArtifactDiff | None = None


class Replica(msgspec.Struct, frozen=True):
    name: str
    host: str | None = None
    gpus: tuple[int | str, ...] = ()
    version: str | None = None
    state: str = "pending"
    reason: str | None = None
    url: str | None = None
    restarts: int = 0
    created_at: Timestamp = None


class Deployment(msgspec.Struct, frozen=True):
    """A deployment's desired state and what the controller observes of it."""

    name: str
    spec: dict[str, Any] = {}
    revision: int = 0
    version: str | None = None
    previous_version: str | None = None
    phase: str = "progressing"
    message: str | None = None
    desired: int = 0
    ready: int = 0
    replicas: tuple[Replica, ...] = ()
    placement: tuple[Any, ...] = ()
    updated_at: Timestamp = None


class Endpoint(msgspec.Struct, frozen=True):
    """A ready replica's OpenAI-compatible base URL."""

    replica: str
    url: str
    host: str | None = None
    version: str | None = None


class Progress(Protocol):
    """Told how far a long transfer has got: ``stage`` is "hash" or "upload"."""

    def __call__(self, stage: str, done: int, total: int) -> None: ...


class LLMOpsError(Exception):
    """Every error the client raises; ``str()`` is one line meant for a person."""


class ControllerUnreachable(LLMOpsError):
    """No HTTP answer from the controller at all (refused, unknown host, timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the controller at {url}: {reason} "
                         "(is llmops-controller running? set LLMOPS_URL or --url to point at it)")


class ApiError(LLMOpsError):
    """The controller answered with an error; ``message`` is its ``"error"`` text."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{message} (HTTP {status})")


class NotFound(ApiError):
    """HTTP 404: no such model, version, alias or deployment."""


class Conflict(ApiError):
    """HTTP 409: an illegal stage change, retiring a version in use, and the like."""


class DeploymentFailed(LLMOpsError):
    """The deployment failed or was rolled back away from the version being deployed."""

    def __init__(self, message: str, deployment: Deployment | None = None) -> None:
        self.message = message
        self.deployment = deployment
        super().__init__(message)


class DeployTimeout(LLMOpsError, TimeoutError):
    """The wait ran out; the message names what was still not ready. The rollout goes on."""

    def __init__(self, message: str, deployment: Deployment | None = None) -> None:
        self.deployment = deployment
        super().__init__(message)


class ModelFileError(LLMOpsError):
    """A model file that is missing or unreadable; raised before anything is sent."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
