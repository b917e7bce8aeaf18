"""The ``vllm`` runtime: ``vllm serve`` with its OpenAI-compatible server and /metrics."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from llm_ops_helper.agent.runtimes.base import LaunchPlan, RuntimeError_
from llm_ops_helper.agent.runtimes.command import http_plan, served_model_name
from llm_ops_helper.proto.messages import ReplicaSpec


def model_argument(runtime: str, spec: ReplicaSpec, model_path: Path | None) -> str:
    """The fetched artifact if there is one, else the source the server fetches itself."""
    if model_path is not None:
        return str(model_path)
    if spec.source_uri:
        return spec.source_uri
    raise RuntimeError_(f"replica {spec.name}: {runtime} needs a model: the spec has neither "
                        f"an artifact nor a source_uri")


# Not frozen: the Runtime protocol's attributes are plain (settable) ones.
@dataclass(slots=True)
class VllmRuntime:
    name: str = "vllm"
    needs_artifact: bool = False
    # argv[0]; found on the PATH the replica is started with.
    binary: str = "vllm"

    def unavailable(self) -> str | None:
        if shutil.which(self.binary) is None:
            return f"{self.binary} is not on PATH (pip install vllm)"
        return None

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        argv = [self.binary, "serve", model_argument(self.name, spec, model_path),
                "--host", host, "--port", str(port),
                "--served-model-name", served_model_name(spec), *spec.args]
        return http_plan(argv, spec, host=host, port=port, metrics_format="vllm")
