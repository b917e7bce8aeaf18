"""LLM Ops Helper: fleet manager for LLM inference on bare-metal GPU hosts.

``from llm_ops_helper import LLMOpsHelper`` is the client of the controller's API. It is loaded
on first use, so the agent and the controller, which live in this namespace too, never import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llm_ops_helper.client import LLMOpsError, LLMOpsHelper

__all__ = ["LLMOpsError", "LLMOpsHelper", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("LLMOpsHelper", "LLMOpsError"):
        from llm_ops_helper import client
        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
