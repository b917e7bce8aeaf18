"""The ``llamacpp`` runtime: llama.cpp's own HTTP server on a GGUF file.

A ``llama-server`` binary is used when there is one (``LLMOPS_LLAMA_SERVER``, else on PATH),
with every layer offloaded to the replica's GPUs. Without one, the same server runs on CPU
through the ``xllamacpp`` wheel (:mod:`llm_ops_helper.agent.runtimes.llamacpp_server`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from llm_ops_helper.agent.runtimes.base import LaunchPlan, RuntimeError_
from llm_ops_helper.agent.runtimes.command import http_plan, served_model_name
from llm_ops_helper.proto.messages import ReplicaSpec

BINARY_ENV: Final = "LLMOPS_LLAMA_SERVER"
LAUNCHER: Final = "llm_ops_helper.agent.runtimes.llamacpp_server"


def find_llama_server(environ: Mapping[str, str] = os.environ) -> str | None:
    """The llama-server binary to use: ``$LLMOPS_LLAMA_SERVER``, else ``llama-server`` on PATH."""
    configured = environ.get(BINARY_ENV)
    if configured:
        return configured
    return shutil.which("llama-server", path=environ.get("PATH"))


# Not frozen: the Runtime protocol's attributes are plain (settable) ones.
@dataclass(slots=True)
class LlamaCppRuntime:
    name: str = "llamacpp"
    needs_artifact: bool = True
    # None: the xllamacpp launcher. Found once, when the registry is built.
    server_binary: str | None = None

    def unavailable(self) -> str | None:
        if self.server_binary is not None:
            if not os.access(self.server_binary, os.X_OK):
                return f"llama-server {self.server_binary!r} is not an executable file"
            return None
        if importlib.util.find_spec("xllamacpp") is None:
            return (f"no llama-server on PATH (or ${BINARY_ENV}) and no xllamacpp package "
                    f"(pip install 'llm-ops-helper[llamacpp]')")
        return None

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        if model_path is None:
            raise RuntimeError_(f"replica {spec.name}: llamacpp needs a GGUF artifact; "
                                f"the spec has none")
        served = served_model_name(spec)
        if self.server_binary is not None:
            # All layers on the replica's GPUs; none when it has none (a CPU replica).
            layers = "999" if spec.gpus else "0"
            argv = [self.server_binary, "-m", str(model_path), "--host", host,
                    "--port", str(port), "--metrics", "--alias", served, "-ngl", layers]
        else:
            argv = [sys.executable, "-m", LAUNCHER, "--model", str(model_path),
                    "--host", host, "--port", str(port), "--alias", served]
        return http_plan([*argv, *spec.args], spec, host=host, port=port,
                         metrics_format="llamacpp")
