"""The collector interface and the loop that runs collectors in isolation.

A collector samples one source and returns what it saw as a :class:`Collected`. It may raise;
:func:`run_collectors` turns any failure into a failed :class:`CollectorStat` for that collector
alone, so one broken source never costs the others their tick (Telegraf's model).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from llm_ops_helper.proto.messages import (
    CollectorStat,
    Event,
    GpuInfo,
    GpuSample,
    HostSample,
    ReplicaSample,
)


@dataclass(slots=True)
class Collected:
    gpus: list[GpuSample] | None = None
    host: HostSample | None = None
    replicas: list[ReplicaSample] | None = None
    events: list[Event] = field(default_factory=list)


@runtime_checkable
class Collector(Protocol):
    name: str

    async def collect(self) -> Collected: ...

    async def close(self) -> None: ...


@runtime_checkable
class GpuCollector(Collector, Protocol):
    """A collector of GPUs (``nvml`` or ``simulated``); both produce the same message shapes."""

    def inventory(self) -> list[GpuInfo]: ...


@dataclass(slots=True)
class Tick:
    """Everything the collectors produced on one tick, merged."""

    collected: Collected
    stats: list[CollectorStat]


async def _run_one(collector: Collector, timeout_s: float) -> tuple[Collected, CollectorStat]:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            result = await collector.collect()
    except TimeoutError:
        error = f"timed out after {timeout_s:.2f} s"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        ms = (time.perf_counter() - start) * 1000
        return result, CollectorStat(name=collector.name, ok=True, duration_ms=round(ms, 3))
    ms = (time.perf_counter() - start) * 1000
    return Collected(), CollectorStat(name=collector.name, ok=False, duration_ms=round(ms, 3),
                                      error=error)


async def run_collectors(collectors: list[Collector], timeout_s: float) -> Tick:
    """Run every collector concurrently, each bounded by ``timeout_s``, and merge the results."""
    results = await asyncio.gather(*(_run_one(c, timeout_s) for c in collectors))
    merged = Collected()
    for collected, _ in results:
        if collected.gpus is not None:
            merged.gpus = (merged.gpus or []) + collected.gpus
        if collected.host is not None:
            merged.host = collected.host
        if collected.replicas is not None:
            merged.replicas = (merged.replicas or []) + collected.replicas
        merged.events.extend(collected.events)
    return Tick(collected=merged, stats=[stat for _, stat in results])
