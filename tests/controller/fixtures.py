"""Small wire messages for controller unit tests."""

from __future__ import annotations

from typing import Any

from llm_ops_helper.proto.messages import (
    GpuSample,
    Histogram,
    HostSample,
    ReplicaSample,
    Status,
    Telemetry,
)

GIB = 1 << 30


def gpu(index: int, **fields: Any) -> GpuSample:
    base: dict[str, Any] = dict(index=index, uuid=f"GPU-{index:04d}", name="NVIDIA A100",
                                utilization_gpu_pct=50.0, memory_used_bytes=20 * GIB,
                                memory_total_bytes=80 * GIB, temperature_c=60.0, power_w=250.0,
                                ecc_corrected_total=0, ecc_uncorrected_total=0)
    return GpuSample(**(base | fields))


def replica(name: str = "r0", up: bool = True, **metrics: float) -> ReplicaSample:
    return ReplicaSample(name=name, runtime="vllm", up=up,
                         metrics={"requests_waiting": 2.0, "requests_finished_total": 100.0}
                         | metrics,
                         histograms={"ttft_seconds": Histogram(sum=5.0, count=100.0)})


def telemetry(host: str = "h1", seq: int = 1, ts: float = 1000.0, gpus: int | list[GpuSample] = 2,
              run_id: str = "run1", interval_s: float = 1.0, **fields: Any) -> Telemetry:
    base: dict[str, Any] = dict(
        host=host, run_id=run_id, seq=seq, ts=ts, interval_s=interval_s,
        host_metrics=HostSample(cpu_pct=20.0, cpu_count=8, load_1m=1.0, load_5m=1.0,
                                load_15m=1.0, memory_total_bytes=64 * GIB,
                                memory_available_bytes=40 * GIB, memory_used_bytes=24 * GIB),
        gpus=[gpu(i) for i in range(gpus)] if isinstance(gpus, int) else gpus)
    return Telemetry(**(base | fields))


def status(host: str = "h1", state: str = "online", ts: float = 1000.0,
           reason: str | None = None) -> Status:
    return Status(host=host, state=state, ts=ts, run_id="run1", interval_s=1.0,  # type: ignore[arg-type]
                  reason=reason)
