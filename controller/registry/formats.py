"""What an artifact is (sniffed from its first bytes) and which runtime serves it by default.

The runtime names mirror the agent's table; the controller keeps its own copy because it
never imports the agent.
"""

from __future__ import annotations

import tomllib
from typing import Final

RUNTIMES: Final = ("llamacpp", "vllm", "sglang", "sim", "command")
FORMATS: Final = ("gguf", "safetensors", "bin", "sim", "unknown")
DEFAULT_RUNTIME: Final = {"gguf": "llamacpp", "sim": "sim"}
# Runtimes that can serve only one format; the others take what their arguments say.
ONLY_FORMAT: Final = {"llamacpp": "gguf", "sim": "sim"}
_EXTENSIONS: Final = {".gguf": "gguf", ".safetensors": "safetensors", ".bin": "bin"}
_FILENAMES: Final = {"gguf": "model.gguf", "safetensors": "model.safetensors",
                     "sim": "model-card.toml"}
# A simulator model card is a small TOML file; anything larger is not sniffed as one.
CARD_MAX_BYTES: Final = 256 * 1024


def sniff(head: bytes, size: int, filename: str | None) -> str:
    """The format of an artifact from its first bytes (``head``), total size and name."""
    if head[:4] == b"GGUF":
        return "gguf"
    if size <= min(len(head), CARD_MAX_BYTES) and _is_model_card(head):
        return "sim"
    return from_name(filename)


def mismatch(runtime: str, fmt: str) -> str | None:
    """Why ``runtime`` cannot serve an artifact of format ``fmt`` (known formats only)."""
    needed = ONLY_FORMAT.get(runtime)
    if needed is None or fmt in (needed, "unknown"):
        return None
    return f"runtime {runtime!r} serves {needed} artifacts, and this one is {fmt}"


def from_name(filename: str | None) -> str:
    if filename:
        lowered = filename.lower()
        for ext, fmt in _EXTENSIONS.items():
            if lowered.endswith(ext):
                return fmt
    return "unknown"


def default_filename(fmt: str) -> str:
    return _FILENAMES.get(fmt, "model.bin")


def _is_model_card(data: bytes) -> bool:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return isinstance(doc.get("sim"), dict)
