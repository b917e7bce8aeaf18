"""Lighter decodings of wire messages, for consumers that need less than all of a message.

The controller reads each replica histogram's sum and count, never its buckets; decoding the
buckets (a tuple per bound, hundreds per snapshot) was 40 % of decoding a telemetry snapshot
and most of its objects, at 2,000 snapshots a second. A view is built from the message type
itself (the same fields, defaults and order), so it cannot drift from the wire contract: only
the fields named get lighter types, it accepts everything the full type accepts, and the
buckets are skipped as unknown fields are.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .messages import ReplicaSample, Telemetry


def view_of(struct: type[msgspec.Struct], name: str,
            lighter: dict[str, Any]) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(struct):
        type_ = lighter.get(f.name, f.type)
        if f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, type_, msgspec.field(default_factory=f.default_factory)))
        elif f.default is not msgspec.NODEFAULT:
            fields.append((f.name, type_, f.default))
        else:
            fields.append((f.name, type_, msgspec.field()))
    return msgspec.defstruct(name, fields, kw_only=True, frozen=True, gc=False,
                             module=__name__)


HistogramTotals = msgspec.defstruct("HistogramTotals", [("sum", float), ("count", float)],
                                    kw_only=True, frozen=True, gc=False, module=__name__)
ReplicaTotals = view_of(ReplicaSample, "ReplicaTotals",
                        {"histograms": dict[str, HistogramTotals]})  # type: ignore[valid-type]
TelemetryTotals = view_of(Telemetry, "TelemetryTotals",
                          {"replicas": list[ReplicaTotals]})  # type: ignore[valid-type]
