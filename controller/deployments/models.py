"""The registry as the engine sees it: a model reference resolved to a version, the runtime
that serves it, the GPU memory a replica of it needs, and the ``deploy_replica`` body an agent
gets for it.

The registry is reached through :class:`ModelResolver`, a Protocol its ``Registry`` fits, so
this package depends on its errors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol

from llm_ops_helper.controller.deployments.errors import Conflict, Invalid, NotFound
from llm_ops_helper.controller.deployments.scheduler import HostView
from llm_ops_helper.controller.deployments.spec import (
    ARTIFACT_RUNTIMES,
    KNOWN_RUNTIMES,
    DeploymentSpec,
)
from llm_ops_helper.controller.deployments.store import ArtifactInfo, ModelInfo, Revision
from llm_ops_helper.controller.registry.errors import RegistryError
from llm_ops_helper.proto.messages import ArtifactRef, ReplicaSpec

MIB: Final = 1 << 20
# Runtimes that take most of a GPU whatever the model's size (vLLM's gpu_memory_utilization).
WHOLE_GPU_RUNTIMES: Final = frozenset({"vllm", "sglang"})


class ResolvedArtifact(Protocol):
    @property
    def sha256(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def filename(self) -> str: ...


class ResolvedVersion(Protocol):
    """What the engine reads of a registry version (the registry's ``Version`` fits)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def ref(self) -> str: ...
    @property
    def runtime(self) -> str: ...
    @property
    def format(self) -> str: ...
    @property
    def artifact(self) -> ResolvedArtifact | None: ...
    @property
    def source_uri(self) -> str | None: ...


class ModelResolver(Protocol):
    def resolve(self, ref: str) -> ResolvedVersion: ...
    def has_artifact(self, sha256: str) -> bool: ...


def resolve(registry: ModelResolver, ref: str) -> ModelInfo:
    """``ref`` resolved now, as the engine keeps it; registry errors become the engine's."""
    try:
        v = registry.resolve(ref)
    except RegistryError as exc:
        error = {404: NotFound, 409: Conflict}.get(exc.status, Invalid)
        raise error(exc.message) from None
    art = v.artifact
    return ModelInfo(model=v.model, version=v.version, ref=v.ref, runtime=v.runtime,
                     format=v.format, source_uri=v.source_uri,
                     artifact=None if art is None else ArtifactInfo(
                         sha256=art.sha256, size_bytes=art.size_bytes, filename=art.filename))


def runtime_for(spec: DeploymentSpec, model: ModelInfo) -> str:
    """The runtime replicas of ``model`` run on (the spec's, else the version's), if it can."""
    runtime = spec.runtime or model.runtime
    if runtime not in KNOWN_RUNTIMES:
        raise Invalid(f"runtime {runtime!r} of {model.ref} is unknown "
                      f"(known: {', '.join(KNOWN_RUNTIMES)})")
    if runtime == "command" and not spec.command:
        raise Invalid("spec field 'command': the command runtime needs an argv")
    if model.artifact is None and model.source_uri is None:
        raise Invalid(f"{model.ref} has neither an artifact nor a source_uri: nothing to run")
    if runtime in ARTIFACT_RUNTIMES and model.artifact is None:
        raise Invalid(f"runtime {runtime} loads an artifact, and {model.ref} has none "
                      f"(only source_uri {model.source_uri!r})")
    return runtime


def gpu_need(spec: DeploymentSpec, runtime: str, model: ModelInfo,
             hosts: Sequence[HostView]) -> int:
    """GPU memory per GPU a replica asks for: stated, or estimated; 0 for CPU only."""
    if spec.gpus_per_replica == 0:
        return 0
    if spec.gpu_memory_bytes:
        return spec.gpu_memory_bytes
    art = model.artifact
    if runtime not in WHOLE_GPU_RUNTIMES:
        # Weights plus KV cache and the runtime's own buffers, for a small context.
        return 0 if art is None else int(art.size_bytes * 1.2) + 256 * MIB
    totals = [g.memory_total_bytes for h in hosts if h.online and runtime in h.runtimes
              for g in h.gpus if g.memory_total_bytes]
    return int(0.9 * min(totals)) if totals else 0


def replica_spec(rev: Revision, name: str, gpus: list[int], need: int,
                 artifact_url: Callable[[str], str]) -> ReplicaSpec:
    spec, art = rev.spec, rev.model.artifact
    artifact = None if art is None else ArtifactRef(
        sha256=art.sha256, size_bytes=art.size_bytes, url=artifact_url(art.sha256),
        filename=art.filename)
    return ReplicaSpec(name=name, deployment=rev.deployment, version=rev.version,
                       runtime=rev.runtime, artifact=artifact, source_uri=rev.model.source_uri,
                       served_model_name=rev.deployment, args=list(spec.args),
                       env=dict(spec.env), gpus=gpus, gpu_memory_bytes=need or None,
                       command=list(spec.command), health_path=spec.health_path,
                       metrics_path=spec.metrics_path, metrics_format=spec.metrics_format,
                       ready_timeout_s=spec.ready_timeout_s,
                       drain_timeout_s=spec.drain_timeout_s)
