"""What a runtime adapter is: a launch plan for a replica, and whether it can run here.

An adapter is data plus one pure function (``plan``); the supervisor does every piece of I/O
(processes, ports, probes). Adapters are picked by name from :data:`RUNTIMES` (uvicorn's table
of implementations), filled in by :mod:`llm_ops_helper.agent.runtimes.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llm_ops_helper.proto.messages import ReplicaSpec


class RuntimeError_(Exception):
    """A replica that cannot be launched as asked; the message names the cause."""


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything the supervisor needs to start one replica and watch it."""

    argv: list[str]
    # Added to the agent's environment (CUDA_VISIBLE_DEVICES is set by the supervisor).
    env: dict[str, str] = field(default_factory=dict)
    # Answers 200 once the model is loaded and the server takes requests.
    health_url: str = ""
    # Prometheus text; None when the server has none.
    metrics_url: str | None = None
    # Which metric_names.toml table reads the metrics page.
    metrics_format: str | None = None
    # Base URL of the OpenAI-compatible API: ``{base_url}/v1/chat/completions``.
    base_url: str = ""


class Runtime(Protocol):
    name: str
    # Whether a deploy must carry an artifact (llamacpp, sim) or may name a source_uri instead.
    needs_artifact: bool

    def unavailable(self) -> str | None:
        """None when this host can run the runtime; otherwise why not ("vllm is not on PATH")."""
        ...

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        """The launch plan; raises :class:`RuntimeError_` for a spec it cannot run."""
        ...
