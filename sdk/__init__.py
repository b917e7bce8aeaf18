"""LLM Ops Helper: fleet manager for LLM inference on bare-metal GPU hosts."""

__version__ = "0.1.0"
