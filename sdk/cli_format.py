"""How the ``llmops`` client commands print: aligned tables for people, JSON for programs."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from llm_ops_helper.client_types import Deployment, ModelVersion, Timestamp

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "gi": 1 << 30,
          "mi": 1 << 20, "ki": 1 << 10, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
          "ti": 1 << 40}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def emit(args: argparse.Namespace, value: Any, text: str) -> None:
    """Print ``value`` as JSON under ``--json``, else ``text``."""
    print(as_json(value) if args.json else text)


def as_json(value: Any) -> str:
    return json.dumps(msgspec.to_builtins(value), indent=2)


def human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_bytes(text: str) -> int:
    """``40GiB``, ``512M`` (binary), ``1.5 GB`` (decimal) or plain bytes (argparse type)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size like 40GiB, 512MiB or 8000000000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (argparse type)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def when(ts: Timestamp) -> str:
    if ts is None or isinstance(ts, str):
        return ts or "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def version_line(v: ModelVersion) -> str:
    size = human_bytes(v.artifact.size_bytes) if v.artifact else "no artifact"
    sha = f", sha256 {v.artifact.sha256[:12]}" if v.artifact else ""
    return f"{v.ref}: {v.stage}, {v.format or '?'} for {v.runtime or '?'}, {size}{sha}"


def deployment_line(d: Deployment) -> str:
    text = f"deployment {d.name}: {d.phase}, {d.ready}/{d.desired} ready on {d.version or '-'}"
    waiting = [f"{r.name} {r.state}" for r in d.replicas if r.state != "ready"]
    if waiting:
        text += f" ({', '.join(waiting)})"
    if d.message:
        text += f"; {d.message}"
    return text
