"""The runtimes an agent knows, by name (uvicorn's table of implementations)."""

from __future__ import annotations

from typing import Final

from llm_ops_helper.agent.runtimes.base import Runtime
from llm_ops_helper.agent.runtimes.command import CommandRuntime
from llm_ops_helper.agent.runtimes.llamacpp import LlamaCppRuntime, find_llama_server
from llm_ops_helper.agent.runtimes.sglang import SglangRuntime
from llm_ops_helper.agent.runtimes.sim import SimRuntime
from llm_ops_helper.agent.runtimes.vllm import VllmRuntime

RUNTIMES: Final[dict[str, Runtime]] = {
    runtime.name: runtime
    for runtime in (LlamaCppRuntime(server_binary=find_llama_server()), VllmRuntime(),
                    SglangRuntime(), SimRuntime(), CommandRuntime())
}


def available_runtimes() -> list[str]:
    """Names of the runtimes this host can run now, sorted."""
    return sorted(name for name, runtime in RUNTIMES.items() if runtime.unavailable() is None)


def unavailable_reasons() -> dict[str, str]:
    """Why each runtime that cannot run here cannot."""
    return {name: why for name, runtime in RUNTIMES.items()
            if (why := runtime.unavailable()) is not None}
