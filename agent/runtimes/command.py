"""The ``command`` runtime: any command line that serves HTTP, with its probe and metrics paths.

It is also the general case the named runtimes build on: :func:`http_plan` turns an argv plus
the server's paths into a :class:`LaunchPlan`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from llm_ops_helper.agent.collectors.metric_map import mappings
from llm_ops_helper.agent.runtimes.base import LaunchPlan, RuntimeError_
from llm_ops_helper.proto.messages import ReplicaSpec

PLACEHOLDERS: Final = ("host", "port", "model", "name")
# A server bound to every interface is reached on loopback from this host.
_WILDCARDS: Final = frozenset({"", "0.0.0.0", "::", "[::]"})


def served_model_name(spec: ReplicaSpec) -> str:
    """The model name clients put in requests: the spec's, else the deployment's name."""
    return spec.served_model_name or spec.deployment


def http_base(host: str, port: int) -> str:
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"http://{host}:{port}"


def _path(value: str, what: str, spec: ReplicaSpec) -> str:
    if not value.startswith("/"):
        raise RuntimeError_(f"replica {spec.name}: {what} must start with '/', got {value!r}")
    return value


def http_plan(argv: list[str], spec: ReplicaSpec, *, host: str, port: int,
              metrics_format: str | None, health_path: str = "/health",
              metrics_path: str | None = "/metrics",
              env: dict[str, str] | None = None) -> LaunchPlan:
    """A plan for a server on ``host:port``; the spec's env is added last (it wins)."""
    base = http_base(host, port)
    health = _path(health_path, "health_path", spec)
    metrics_url = None if metrics_path is None else base + _path(metrics_path, "metrics_path", spec)
    return LaunchPlan(argv=argv, env={**(env or {}), **spec.env}, health_url=base + health,
                      metrics_url=metrics_url,
                      metrics_format=metrics_format if metrics_url else None,
                      base_url=base)


def _fill(arg: str, values: dict[str, str], spec: ReplicaSpec) -> str:
    """One argument with its placeholders filled; ``{{`` and ``}}`` stand for braces."""
    out: list[str] = []
    try:
        parsed = list(string.Formatter().parse(arg))
    except ValueError as exc:
        raise RuntimeError_(f"replica {spec.name}: command argument {arg!r}: {exc}") from None
    for literal, field, spec_part, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec_part or conversion:
            raise RuntimeError_(
                f"replica {spec.name}: command argument {arg!r}: unknown placeholder "
                f"{{{field}}}; known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        if field not in values:
            raise RuntimeError_(f"replica {spec.name}: command argument {arg!r} uses {{model}} "
                                f"but the spec has neither an artifact nor a source_uri")
        out.append(values[field])
    return "".join(out)


# Not frozen: the Runtime protocol's attributes are plain (settable) ones.
@dataclass(slots=True)
class CommandRuntime:
    name: str = "command"
    needs_artifact: bool = False

    def unavailable(self) -> str | None:
        return None

    def plan(self, spec: ReplicaSpec, *, model_path: Path | None, host: str,
             port: int) -> LaunchPlan:
        if not spec.command or not spec.command[0]:
            raise RuntimeError_(f"replica {spec.name}: the command runtime needs a command "
                                f"(an argv list with {{host}} {{port}} {{model}} {{name}})")
        values = {"host": host, "port": str(port), "name": served_model_name(spec)}
        model = str(model_path) if model_path is not None else spec.source_uri
        if model:
            values["model"] = model
        argv = [_fill(arg, values, spec) for arg in spec.command] + list(spec.args)
        fmt = spec.metrics_format
        if fmt is not None and fmt not in mappings():
            raise RuntimeError_(f"replica {spec.name}: unknown metrics_format {fmt!r}; "
                                f"known: {', '.join(sorted(mappings()))}")
        # Without a metrics_format the page is still there (metrics_url) but no table reads it.
        return http_plan(argv, spec, host=host, port=port, metrics_format=fmt,
                         health_path=spec.health_path, metrics_path=spec.metrics_path)
