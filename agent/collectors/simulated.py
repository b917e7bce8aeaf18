"""Simulated GPUs that look like real ones to everything downstream.

Samples have the shape the NVML collector produces for the same board (same fields reported,
same fields ``None``), the values start from a real ``nvidia-smi`` dump (see
:mod:`gpu_profiles`), and a :class:`Scenario` scripts faults over time. The model is small:
utilisation follows a pattern; power follows utilisation within a couple of seconds; temperature
follows power over half a minute; clocks drop at idle, under a power cap and when hot, with the
clock-event reasons NVML would give. Given the seed and the clock, every sample is the same.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from llm_ops_helper.agent.collectors.base import Collected
from llm_ops_helper.agent.collectors.gpu_profiles import MIB, PROFILES, GpuProfile, get_profile
from llm_ops_helper.agent.collectors.nvml import (
    THROTTLE_REASON_NAMES,
    GpuEventTracker,
    xid_event,
)
from llm_ops_helper.agent.collectors.scenario import (
    Disappear,
    Ecc,
    PcieReplay,
    Power,
    Scenario,
    ScenarioEvent,
    TemperatureRamp,
    Throttle,
    Utilization,
    Window,
    Xid,
)
from llm_ops_helper.proto.messages import Event, GpuInfo, GpuSample

__all__ = ["GPU_LOST_ERROR", "PROFILES", "SimulatedGpuCollector"]

_E = TypeVar("_E", bound=ScenarioEvent)
_W = TypeVar("_W", bound=Window)

GPU_LOST_ERROR = str(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST))  # "GPU is lost"
IDLE_BELOW_PCT = 5.0
POWER_TAU_S = 2.0
TEMPERATURE_TAU_S = 30.0
CLOCK_STEP_MHZ = 15
# Share of the default power limit drawn at 100 % utilisation, and of the headroom to the
# maximum operating temperature reached there: a busy board runs warm, not at its limits.
FULL_LOAD_POWER_SHARE = 0.92
FULL_LOAD_HEAT_SHARE = 0.55
DEFAULT_MAX_OPERATING_C = 85.0


@dataclass(slots=True)
class _Ramp:
    entry: TemperatureRamp
    start_c: float


@dataclass(slots=True)
class _Gpu:
    index: int
    uuid: str
    temperature_c: float
    power_w: float
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    retired_pages: int = 0
    remapped_correctable: int = 0
    remapped_uncorrectable: int = 0
    pending: bool = False  # a page retirement or row remap that waits for a GPU reset
    pcie_replay: int = 0
    ramp: _Ramp | None = None


def _pattern_pct(entry: Utilization, t: float) -> float:
    phase = ((t - entry.at_s) % entry.period_s) / entry.period_s
    if entry.pattern == "sine":
        return entry.level_pct * (0.5 - 0.5 * math.cos(2 * math.pi * phase))
    if entry.pattern == "square":
        return entry.level_pct if phase < 0.5 else 0.0
    if entry.pattern == "constant":
        return entry.level_pct
    return 0.0


def _approach(current: float, target: float, dt: float, tau: float) -> float:
    return target + (current - target) * math.exp(-dt / tau)


def _latest(entries: list[_W], t: float) -> _W | None:
    """The active entry that started last (the later in the file if two start together)."""
    active = [e for e in entries if e.active(t)]
    return max(reversed(active), key=lambda e: e.at_s, default=None)


class SimulatedGpuCollector:
    """``count`` GPUs of one ``profile`` on ``host``, optionally driven by a ``scenario``."""

    name = "simulated"

    def __init__(self, host: str, count: int = 8, profile: str = "a100-sxm4-80gb",
                 scenario: Scenario | None = None, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 epoch: float | None = None) -> None:
        self.host = host
        self.count = count
        self.profile: GpuProfile = get_profile(profile)
        self.scenario = scenario or Scenario()
        self.scenario.check_gpus(count)
        self.seed = seed
        self._clock = clock
        self._start = clock()
        # Event timestamps are wall time: the start's wall time plus the clock's elapsed time.
        self._epoch = time.time() if epoch is None else epoch
        self._last_t = 0.0
        self._rng = random.Random(f"{host}:{seed}")
        self._fired: set[int] = set()
        self._by_kind: dict[tuple[type, int], list[Any]] = {}
        self._tracker = GpuEventTracker(host)
        # Bytes per GPU index that the replicas served here hold (the agent wires in its
        # supervisor's count): a simulated board reports them as used, as a real one would.
        self.memory_in_use: Callable[[], Mapping[int, int]] = dict
        p = self.profile
        self._gpus = [
            _Gpu(index=i, temperature_c=p.idle_temperature_c, power_w=p.idle_power_w,
                 uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'llmops-sim://{host}/{seed}/{i}')}")
            for i in range(count)
        ]

    def inventory(self) -> list[GpuInfo]:
        return [GpuInfo(index=g.index, uuid=g.uuid, name=self.profile.name,
                        memory_total_bytes=self.profile.memory_total_bytes) for g in self._gpus]

    async def collect(self) -> Collected:
        t = self._clock() - self._start
        dt, self._last_t = max(0.0, t - self._last_t), max(t, self._last_t)
        events = self._fire(t)
        in_use = self.memory_in_use()
        samples = [self._step(gpu, t, dt, in_use.get(gpu.index, 0)) for gpu in self._gpus]
        events.extend(self._tracker.observe(samples, self._epoch + t))
        return Collected(gpus=samples, events=events)

    async def close(self) -> None:
        return None

    def _fire(self, t: float) -> list[Event]:
        """Apply the one-off entries whose time has come, each exactly once."""
        events: list[Event] = []
        due = sorted((e.at_s, i) for i, e in enumerate(self.scenario.events)
                     if i not in self._fired and e.at_s <= t)
        for _, i in due:
            self._fired.add(i)
            entry = self.scenario.events[i]
            for gpu in (g for g in self._gpus if entry.applies_to(g.index)):
                if isinstance(entry, Xid):
                    events.append(xid_event(self.host, self._epoch + entry.at_s, gpu.index,
                                            entry.xid))
                elif isinstance(entry, Ecc):
                    self._add_ecc(gpu, entry)
                elif isinstance(entry, TemperatureRamp):
                    gpu.ramp = _Ramp(entry=entry, start_c=gpu.temperature_c)
                elif isinstance(entry, PcieReplay):
                    gpu.pcie_replay += entry.count
        return events

    def _add_ecc(self, gpu: _Gpu, entry: Ecc) -> None:
        if not self.profile.ecc_enabled:
            return  # as on a real board: with ECC off there is nothing to count
        gpu.ecc_corrected += entry.corrected
        gpu.ecc_uncorrected += entry.uncorrected
        if entry.uncorrected:
            gpu.pending = True
            if self.profile.row_remapping:
                gpu.remapped_uncorrectable += entry.uncorrected
            elif self.profile.page_retirement:
                gpu.retired_pages += entry.uncorrected

    def _entries(self, kind: type[_E], gpu: int) -> list[_E]:
        # The scenario never changes: filter it once per (kind, GPU), not on every tick.
        key = (kind, gpu)
        found = self._by_kind.get(key)
        if found is None:
            found = self._by_kind[key] = [e for e in self.scenario.events
                                          if isinstance(e, kind) and e.applies_to(gpu)]
        return found

    def _step(self, gpu: _Gpu, t: float, dt: float, replica_bytes: int = 0) -> GpuSample:
        p = self.profile
        lost = _latest(self._entries(Disappear, gpu.index), t) is not None
        pattern = _latest(self._entries(Utilization, gpu.index), t)
        target = 0.0 if pattern is None or lost else _pattern_pct(pattern, t)
        noise = self._rng.uniform(-1.5, 1.5)  # drawn every tick, lost or not: stays deterministic
        util = float(round(min(100.0, max(0.0, target + noise))))

        cap = _latest(self._entries(Power, gpu.index), t)
        # Clamped to what the board accepts, as the driver does for ``nvidia-smi -pl``.
        limit_w = (min(max(cap.limit_w, p.power_limit_min_w), p.power_limit_max_w) if cap
                   else p.power_limit_default_w)
        span_w = p.power_limit_default_w - p.idle_power_w
        demand_w = p.idle_power_w + span_w * FULL_LOAD_POWER_SHARE * util / 100
        gpu.power_w = _approach(gpu.power_w, min(demand_w, limit_w), dt, POWER_TAU_S)

        max_operating = p.max_operating_temperature_c or DEFAULT_MAX_OPERATING_C
        heat = FULL_LOAD_HEAT_SHARE * (max_operating - p.idle_temperature_c)
        target_c = p.idle_temperature_c + heat * (gpu.power_w - p.idle_power_w) / span_w
        gpu.temperature_c = _approach(gpu.temperature_c, target_c, dt, TEMPERATURE_TAU_S)
        if gpu.ramp is not None:
            self._follow_ramp(gpu, t)

        if lost:
            return GpuSample(index=gpu.index, uuid=gpu.uuid, name=p.name, healthy=False,
                             error=GPU_LOST_ERROR)
        reasons = self._reasons(gpu, t, util, demand_w > limit_w)
        return GpuSample(
            index=gpu.index, uuid=gpu.uuid, name=p.name,
            utilization_gpu_pct=util,
            utilization_memory_pct=float(round(util * 0.6)),
            memory_used_bytes=min(p.memory_total_bytes,
                                  p.idle_memory_used_mib * MIB + replica_bytes),
            memory_total_bytes=p.memory_total_bytes,
            temperature_c=float(round(gpu.temperature_c)),
            power_w=round(gpu.power_w, 2),
            power_limit_w=limit_w,
            sm_clock_mhz=self._sm_clock(reasons, limit_w, demand_w),
            sm_clock_max_mhz=p.sm_clock_max_mhz,
            throttle_reasons=reasons,
            ecc_corrected_total=gpu.ecc_corrected if p.ecc_enabled else None,
            ecc_uncorrected_total=gpu.ecc_uncorrected if p.ecc_enabled else None,
            retired_pages=gpu.retired_pages if p.page_retirement else None,
            retired_pages_pending=gpu.pending if p.page_retirement else None,
            remapped_rows_correctable=gpu.remapped_correctable if p.row_remapping else None,
            remapped_rows_uncorrectable=gpu.remapped_uncorrectable if p.row_remapping else None,
            remapped_rows_pending=gpu.pending if p.row_remapping else None,
            remapped_rows_failure=False if p.row_remapping else None,
            pcie_replay_count=gpu.pcie_replay,
        )

    @staticmethod
    def _follow_ramp(gpu: _Gpu, t: float) -> None:
        assert gpu.ramp is not None
        entry, elapsed = gpu.ramp.entry, t - gpu.ramp.entry.at_s
        done = 1.0 if entry.over_s == 0 else min(1.0, elapsed / entry.over_s)
        gpu.temperature_c = gpu.ramp.start_c + (entry.to_c - gpu.ramp.start_c) * done
        if entry.hold_s is not None and elapsed >= entry.over_s + entry.hold_s:
            gpu.ramp = None  # released: from here the board cools (or heats) on its own

    def _reasons(self, gpu: _Gpu, t: float, util: float, power_capped: bool) -> list[str]:
        p = self.profile
        active: set[str] = set()
        if util < IDLE_BELOW_PCT:
            active.add("gpu_idle")
        if power_capped:
            active.add("sw_power_cap")
        temperature = round(gpu.temperature_c)
        max_operating, slowdown = p.max_operating_temperature_c, p.slowdown_temperature_c
        if max_operating is not None and temperature > max_operating:
            active.add("sw_thermal_slowdown")
        if slowdown is not None and temperature >= slowdown:
            active.update(("hw_slowdown", "hw_thermal_slowdown"))
        for entry in self._entries(Throttle, gpu.index):
            if entry.active(t):
                active.update(entry.reasons)
        return [name for name in THROTTLE_REASON_NAMES if name in active]

    def _sm_clock(self, reasons: list[str], limit_w: float, demand_w: float) -> int:
        p = self.profile
        if "gpu_idle" in reasons:
            return p.idle_sm_clock_mhz
        mhz = float(p.sm_clock_max_mhz)
        if "sw_power_cap" in reasons:
            mhz *= math.sqrt(limit_w / demand_w)
        if "sw_thermal_slowdown" in reasons:
            mhz *= 0.85
        if {"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"} & set(reasons):
            mhz *= 0.5
        stepped = int(mhz // CLOCK_STEP_MHZ) * CLOCK_STEP_MHZ
        return max(p.idle_sm_clock_mhz, stepped)
