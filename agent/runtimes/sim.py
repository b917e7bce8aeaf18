"""The ``sim`` runtime: the project's vLLM-compatible simulator, driven by a TOML model card.

See :mod:`llm_ops_helper.agent.runtimes.simserver` for the card and what the server does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llm_ops_helper.agent.runtimes.base import LaunchPlan, RuntimeError_
from llm_ops_helper.agent.runtimes.command import http_plan, served_model_name
from llm_ops_helper.proto.messages import ReplicaSpec


# Not frozen: the Runtime protocol's attributes are plain (settable) ones.
@dataclass(slots=True)
class SimRuntime:
    name: str = "sim"
    needs_artifact: bool = True

    def unavailable(self) -> str | None:
        return None  # ships with the agent; aiohttp and prometheus_client are base deps

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        if model_path is None:
            raise RuntimeError_(f"replica {spec.name}: the sim runtime needs its model card "
                                f"(a TOML artifact with a [sim] table); the spec has no artifact")
        argv = [sys.executable, "-m", "llm_ops_helper.agent.runtimes.simserver",
                "--model-card", str(model_path), "--host", host, "--port", str(port),
                "--served-model-name", served_model_name(spec), *spec.args]
        return http_plan(argv, spec, host=host, port=port, metrics_format="sim")
