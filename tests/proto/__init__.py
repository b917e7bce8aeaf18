"""Tests of the wire contract (``llm_ops_helper.proto``) and the hypothesis strategies they share.

The struct strategies are derived from the msgspec field types, so a field added to a message
is generated (and round-tripped) without touching the tests.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
from hypothesis import strategies as st

from llm_ops_helper.proto import (
    Alert,
    Command,
    CommandResult,
    Event,
    GpuInfo,
    GpuSample,
    Histogram,
    HostSample,
    ReplicaSample,
    Status,
    Telemetry,
)
from llm_ops_helper.proto.messages import AgentCounters, CollectorStat

# Every top-level payload type on the wire.
MESSAGE_TYPES: tuple[type[msgspec.Struct], ...] = (
    Telemetry, Status, Event, Command, CommandResult, Alert,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
SHORT_TEXT = st.text(max_size=12)

# JSON values as msgspec decodes them into ``Any`` (64-bit ints, finite floats).
JSON_SCALARS = st.none() | st.booleans() | INT64 | FINITE_FLOATS | SHORT_TEXT
JSON_VALUES: st.SearchStrategy[Any] = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(SHORT_TEXT, children, max_size=4),
    max_leaves=12,
)
JSON_OBJECTS: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    SHORT_TEXT, JSON_VALUES, max_size=5
)

_SCALARS: dict[Any, st.SearchStrategy[Any]] = {
    Any: JSON_VALUES,
    bool: st.booleans(),
    int: INT64,
    float: FINITE_FLOATS,
    str: SHORT_TEXT,
    type(None): st.none(),
}


def for_type(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for values of a msgspec field type, limited to what JSON round-trips."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (Union, types.UnionType):
        return st.one_of(*(for_type(a) for a in args))
    if origin is list:
        return st.lists(for_type(args[0]), max_size=3)
    if origin is tuple:
        return st.tuples(*(for_type(a) for a in args))
    if origin is dict:
        return st.dictionaries(for_type(args[0]), for_type(args[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return structs(tp)
    raise TypeError(f"no strategy for field type {tp!r}")


def structs(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Instances of ``cls`` with every field (defaulted ones too) drawn; ``v`` left at its default."""
    return st.builds(cls, **{
        f.name: for_type(f.type) for f in msgspec.structs.fields(cls) if f.name != "v"
    })


MESSAGES: st.SearchStrategy[msgspec.Struct] = st.one_of(*(structs(t) for t in MESSAGE_TYPES))


# The smallest valid payload of each message type (required fields only).
MINIMAL: dict[type[msgspec.Struct], dict[str, Any]] = {
    Telemetry: {"host": "h1", "run_id": "r1", "seq": 0, "ts": 1.5, "interval_s": 10.0},
    Status: {"host": "h1", "state": "online", "ts": 1.5},
    Event: {"host": "h1", "ts": 1.5, "kind": "xid"},
    Command: {"id": "c1", "kind": "sync", "issued_at": 1.0, "expires_at": 2.0, "key_id": "k1"},
    CommandResult: {"command_id": "c1", "host": "h1", "status": "ok", "ts": 1.5},
    Alert: {"id": "a1", "state": "firing", "severity": "warning", "rule": "gpu_hot", "ts": 1.5},
}


def _histogram(scale: float) -> Histogram:
    bounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    return Histogram(
        sum=123.25 * scale,
        count=1000.0,
        buckets=[(le, float(min(1000, int(100 * (i + 1) * scale)))) for i, le in enumerate(bounds)],
    )


def full_telemetry(gpus: int = 8, replicas: int = 4) -> Telemetry:
    return Telemetry(
        host="gpu-node-01",
        run_id="3f1c2a",
        seq=42,
        ts=1_732_850_000.125,
        interval_s=10.0,
        host_metrics=HostSample(
            cpu_pct=12.5, cpu_count=128, load_1m=3.25, load_5m=2.0, load_15m=1.5,
            memory_total_bytes=2 << 40, memory_available_bytes=1 << 40,
            memory_used_bytes=1 << 40, disk_read_bytes_total=None, boot_time=1_732_000_000.5,
        ),
        gpus=[
            GpuSample(
                index=i, uuid=f"GPU-{i:08x}", name="NVIDIA H200", utilization_gpu_pct=97.0,
                memory_used_bytes=130 << 30, memory_total_bytes=141 << 30, temperature_c=71.0,
                power_w=612.5, power_limit_w=700.0, sm_clock_mhz=1980, sm_clock_max_mhz=1980,
                throttle_reasons=["sw_power_cap"], ecc_corrected_total=0,
                ecc_uncorrected_total=0, remapped_rows_pending=False, pcie_replay_count=0,
            )
            for i in range(gpus)
        ],
        replicas=[
            ReplicaSample(
                name=f"llama-70b-{r}", runtime="vllm", up=True, scrape_ms=3.5,
                metrics={"requests_running": 12.0, "kv_cache_usage": 0.83,
                         "prompt_tokens_total": 1.5e9},
                histograms={"ttft_seconds": _histogram(1.0), "itl_seconds": _histogram(0.5),
                            "e2e_seconds": _histogram(2.0)},
            )
            for r in range(replicas)
        ],
        collectors=[CollectorStat(name="nvml", ok=True, duration_ms=4.25),
                    CollectorStat(name="vllm", ok=False, duration_ms=1000.0, error="timeout")],
        agent=AgentCounters(buffered=3, reconnects=1, commands_rejected={"expired": 2}),
    )


def _samples() -> dict[type[msgspec.Struct], list[msgspec.Struct]]:
    command = Command(id="c1", kind="deploy_replica", issued_at=1.25, expires_at=61.25,
                      key_id="k1", body={"name": "r1", "gpus": [0, 1],
                                         "args": {"tp": 2, "dtype": None, "ratio": 0.9}},
                      sig="ab" * 32)
    return {
        Telemetry: [full_telemetry(gpus=2, replicas=2)],
        Status: [Status(host="h1", state="offline", ts=2.5, run_id="r", agent_version="0.1.0",
                        interval_s=10.0, capabilities=["nvml", "vllm"],
                        gpus=[GpuInfo(index=0, uuid="GPU-0", name="H200",
                                      memory_total_bytes=141 << 30)],
                        runtimes=["vllm", "sglang"], reason="lost")],
        Event: [Event(host="h1", ts=3.5, kind="xid", severity="critical", message="Xid 79",
                      gpu=3, replica="r1", data={"xid": 79, "pid": None, "fatal": True,
                                                 "ratio": 0.5, "text": "fallen off the bus"})],
        Command: [command],
        CommandResult: [CommandResult(command_id="c1", host="h1", status="error", ts=4.5,
                                      error="no_gpu", detail={"free": [], "wanted": 2,
                                                              "why": {"gpu": [0, 1.5, True]}})],
        Alert: [Alert(id="a1", state="resolved", severity="info", rule="replica_down", host="h1",
                      gpu=2, replica="r1", summary="back \u2713", ts=5.5,
                      labels={"team": "ml", "dc": "eu-1"})],
    }


# Hand-written messages of each type with (nearly) every field set.
SAMPLES: dict[type[msgspec.Struct], list[msgspec.Struct]] = _samples()
