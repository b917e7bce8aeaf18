"""The ``sglang`` runtime: ``python -m sglang.launch_server``, with its metrics turned on.

SGLang has no console script of its own; it runs in the agent's Python, so it must be
installed there.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from llm_ops_helper.agent.runtimes.base import LaunchPlan
from llm_ops_helper.agent.runtimes.command import http_plan, served_model_name
from llm_ops_helper.agent.runtimes.vllm import model_argument
from llm_ops_helper.proto.messages import ReplicaSpec


# Not frozen: the Runtime protocol's attributes are plain (settable) ones.
@dataclass(slots=True)
class SglangRuntime:
    name: str = "sglang"
    needs_artifact: bool = False

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("sglang") is None:
            return f"sglang is not installed in {sys.executable} (pip install 'sglang[all]')"
        return None

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        argv = [sys.executable, "-m", "sglang.launch_server",
                "--model-path", model_argument(self.name, spec, model_path),
                "--host", host, "--port", str(port),
                "--served-model-name", served_model_name(spec),
                # Without it /metrics answers 404 and the replica is scraped blind.
                "--enable-metrics", *spec.args]
        return http_plan(argv, spec, host=host, port=port, metrics_format="sglang")
