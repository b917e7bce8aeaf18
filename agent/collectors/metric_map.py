"""Which source metrics of each runtime feed which canonical name: ``metric_names.toml``, read
and validated once (its header comment documents the format).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Final

AGGREGATIONS: Final = ("sum", "max", "mean", "min")

# A label matcher: label name -> the values allowed, sorted by name (hashable, comparable).
LabelMatcher = tuple[tuple[str, frozenset[str]], ...]
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class ScalarSpec:
    sources: tuple[str, ...]
    agg: str
    # Only series whose labels have one of the allowed values for every name here feed it.
    labels: LabelMatcher = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return matches(self.labels, labels)


def matches(matcher: LabelMatcher, labels: Mapping[str, str]) -> bool:
    return all(labels.get(name) in allowed for name, allowed in matcher)


@dataclass(frozen=True, slots=True)
class RuntimeMapping:
    runtime: str
    metrics: Mapping[str, ScalarSpec]
    histograms: Mapping[str, tuple[str, ...]]
    disabled_status: int | None = None
    disabled_hint: str | None = None


class MetricsMappingError(ValueError):
    """metric_names.toml does not have the expected shape."""


def _fail(where: str, expected: str, got: object) -> MetricsMappingError:
    return MetricsMappingError(f"metric_names.toml: [{where}]: expected {expected}, got {got!r}")


def _names(value: object, where: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(n, str) and n for n in value)):
        raise _fail(where, "a non-empty list of metric names", value)
    return tuple(value)


def _label_matcher(value: object, where: str) -> LabelMatcher:
    """``labels = { name = "value" | ["value", ...], ... }``; absent means every series."""
    if value is None:
        return ()
    if not (isinstance(value, dict) and value):
        raise _fail(where, "labels as a non-empty table of label name = value(s)", value)
    matcher: list[tuple[str, frozenset[str]]] = []
    for name, allowed in sorted(value.items()):
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise _fail(where, "labels keyed by Prometheus label names", name)
        values = [allowed] if isinstance(allowed, str) else allowed
        if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)):
            raise _fail(where, f"labels.{name} as a string or a non-empty list of strings",
                        allowed)
        matcher.append((name, frozenset(values)))
    return tuple(matcher)


def _runtime_mapping(runtime: str, table: dict[str, Any]) -> RuntimeMapping:
    unknown = set(table) - {"metrics", "histograms", "disabled_status", "disabled_hint"}
    if unknown:
        raise _fail(runtime, "keys metrics, histograms, disabled_status, disabled_hint",
                    sorted(unknown))
    metrics: dict[str, ScalarSpec] = {}
    for canonical, spec in table.get("metrics", {}).items():
        where = f"{runtime}.metrics.{canonical}"
        if not (isinstance(spec, dict) and {"from", "agg"} <= set(spec) <= {"from", "agg",
                                                                             "labels"}):
            raise _fail(where, '{ from = [...], agg = "..." } and optionally labels = { ... }',
                        spec)
        if spec["agg"] not in AGGREGATIONS:
            raise _fail(where, f"agg one of {', '.join(AGGREGATIONS)}", spec["agg"])
        metrics[canonical] = ScalarSpec(_names(spec["from"], where), spec["agg"],
                                        _label_matcher(spec.get("labels"), where))
    histograms = {canonical: _names(sources, f"{runtime}.histograms.{canonical}")
                  for canonical, sources in table.get("histograms", {}).items()}
    status, hint = table.get("disabled_status"), table.get("disabled_hint")
    if status is not None and not isinstance(status, int):
        raise _fail(f"{runtime}.disabled_status", "an HTTP status code", status)
    if hint is not None and not isinstance(hint, str):
        raise _fail(f"{runtime}.disabled_hint", "a string", hint)
    return RuntimeMapping(runtime, metrics, histograms, status, hint)


def parse_mappings(data: dict[str, Any]) -> dict[str, RuntimeMapping]:
    """Validate the decoded TOML: one table per runtime, or ``same_as = "<runtime>"``."""
    out: dict[str, RuntimeMapping] = {}
    for runtime, table in data.items():
        if not isinstance(table, dict):
            raise _fail(runtime, "a table", table)
        if "same_as" not in table:
            out[runtime] = _runtime_mapping(runtime, table)
    for runtime, table in data.items():
        if "same_as" in table:
            base = out.get(table["same_as"])
            if base is None or len(table) != 1:
                raise _fail(runtime, "only same_as naming a runtime with its own table", table)
            out[runtime] = RuntimeMapping(runtime, base.metrics, base.histograms,
                                          base.disabled_status, base.disabled_hint)
    return out


@functools.cache
def mappings() -> dict[str, RuntimeMapping]:
    """The mappings shipped with the package, read and validated once."""
    text = files("llm_ops_helper.agent").joinpath("metric_names.toml").read_text("utf-8")
    return parse_mappings(tomllib.loads(text))


def mapping_for(runtime: str) -> RuntimeMapping:
    try:
        return mappings()[runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {runtime!r}; known: "
                         f"{', '.join(sorted(mappings()))}") from None
