"""The simulator's model card: a TOML file with its latency model and the faults to inject.

    [sim]
    startup_s = 2.0                 # /health answers 503 "Loading model" this long
    ttft_base_ms = 20.0             # time to first token once a request runs ...
    ttft_per_prompt_token_ms = 0.1  # ... plus this per prompt token (prompt tokens ~ chars/4)
    itl_ms = 10.0                   # between two output tokens
    max_concurrency = 16            # requests running at once; the rest wait in a queue
    kv_cache_tokens = 16384         # KV cache size: usage = tokens held by running requests / this
    max_tokens = 16                 # output tokens when a request does not say

    [faults]
    exit_at_start = false           # exit 1 at the end of start-up, as a model that fails to load
    error_rate = 0.0                # share of completion requests answered 500
    hang = false                    # accept connections, never answer (health too)
    hang_after_s = 30.0             # ... from this long after becoming ready (omit: never)
    crash_after_s = 60.0            # exit 1 this long after becoming ready (omit: never)

Only ``[sim]`` is required, and all its keys have defaults; an unknown key is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import msgspec

from llm_ops_helper.tomlfile import ConfigError, NonNegative, Section, parse, read_text

Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class LatencyModel(Section, kw_only=True, frozen=True):
    startup_s: NonNegative = 0.0
    ttft_base_ms: NonNegative = 20.0
    ttft_per_prompt_token_ms: NonNegative = 0.1
    itl_ms: NonNegative = 10.0
    max_concurrency: PositiveInt = 16
    kv_cache_tokens: PositiveInt = 16384
    max_tokens: PositiveInt = 16


class Faults(Section, kw_only=True, frozen=True):
    exit_at_start: bool = False
    error_rate: Ratio = 0.0
    hang: bool = False
    hang_after_s: NonNegative | None = None
    crash_after_s: NonNegative | None = None


class ModelCard(Section, kw_only=True, frozen=True):
    sim: LatencyModel
    faults: Faults = Faults()


def load_card(path: str | Path) -> ModelCard:
    """The card at ``path``; :class:`ConfigError` naming the file and the key if it is bad."""
    return parse(read_text(path), str(path), ModelCard)


def write_model_card(path: str | Path, **params: Any) -> Path:
    """Write a card; each keyword is a key of ``[sim]`` or ``[faults]`` (for tests and demos).

    Values are written as given, not checked: a test can write a bad card on purpose.
    """
    tables: dict[str, dict[str, Any]] = {"sim": {}, "faults": {}}
    for key, value in params.items():
        table = ("sim" if key in LatencyModel.__struct_fields__
                 else "faults" if key in Faults.__struct_fields__ else None)
        if table is None:
            known = (*LatencyModel.__struct_fields__, *Faults.__struct_fields__)
            raise ValueError(f"unknown model card key {key!r}; known: {', '.join(known)}")
        tables[table][key] = value
    lines: list[str] = []
    for table, values in tables.items():
        if table == "sim" or values:
            lines.append(f"[{table}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise ValueError(f"model card values are numbers, booleans or strings, got {value!r}")


__all__ = ["ConfigError", "Faults", "LatencyModel", "ModelCard", "load_card", "write_model_card"]
