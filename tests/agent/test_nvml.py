"""The NVML collector against real boards' readings.

There is no GPU here, so the fake sits at the narrowest boundary: ``pynvml``'s module
functions, answering from a table read out of real ``nvidia-smi -q -x`` dumps (a heterogeneous
host: the A100, A10G, T4 and RTX 4000 SFF Ada dumps as GPUs 0..3). ``N/A`` in a dump becomes
``NVMLError_NotSupported``, as NVML reports it.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pynvml
import pytest

from llm_ops_helper.agent.collectors.base import GpuCollector
from llm_ops_helper.agent.collectors.nvml import (
    THROTTLE_REASON_NAMES,
    NvmlCollector,
    NvmlUnavailable,
    decode_throttle_reasons,
)
from llm_ops_helper.agent.collectors.simulated import SimulatedGpuCollector
from llm_ops_helper.proto.messages import Event, GpuSample
from tests.agent.nvidia_smi import dump, integer, number, text

BOARDS = ("a100-sxm4-v12.xml", "a10g.xml", "tesla-t4.xml", "rtx-4000-sff-ada-v13.xml")
MIB = 1024 * 1024
# nvidia-smi's reason names -> NVML's bits, straight from pynvml.
REASON_BITS = {
    "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake_slowdown": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
    "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    "display_clocks_setting": pynvml.nvmlClocksEventReasonDisplayClockSetting,
}


@dataclass
class FakeGpu:
    """One board's readings in NVML's units; None is what NVML answers NotSupported for."""

    uuid: str
    name: str
    memory_total: int
    memory_used: int
    utilization: tuple[int, int] | None
    temperature: int
    power_mw: int | None
    limit_mw: int | None
    sm_clock: int
    sm_clock_max: int
    reasons: int
    ecc: tuple[int, int] | None
    retired: tuple[list[int], list[int], int] | None
    remapped: tuple[int, int, int, int] | None
    replay: int
    lost: bool = False


def from_dump(name: str) -> FakeGpu:
    g = dump(name)
    reasons = 0
    for block in ("clocks_event_reasons", "clocks_throttle_reasons"):
        for element in g.findall(f"{block}/*"):
            reason = element.tag.split("reason_", 1)[1]
            if (element.text or "").strip() == "Active":
                reasons |= REASON_BITS[reason]
    volatile = g.find("ecc_errors/volatile")
    assert volatile is not None
    counts = {e.tag: (e.text or "").strip() for e in volatile}
    ecc = None
    if text(g, "ecc_mode/current_ecc") == "Enabled":
        ecc = (sum(int(v) for k, v in counts.items() if k.endswith("_correctable")),
               sum(int(v) for k, v in counts.items() if "_uncorrectable" in k))
    retired = None
    single = integer(g, "retired_pages/multiple_single_bit_retirement/retired_count")
    double = integer(g, "retired_pages/double_bit_retirement/retired_count")
    if single is not None and double is not None:
        pending = text(g, "retired_pages/pending_retirement") == "Yes"
        retired = (list(range(single)), list(range(double)), int(pending))
    remapped = None
    if g.find("remapped_rows/remapped_row_corr") is not None:
        remapped = (int(number(g, "remapped_rows/remapped_row_corr") or 0),
                    int(number(g, "remapped_rows/remapped_row_unc") or 0),
                    int(text(g, "remapped_rows/remapped_row_pending") == "Yes"),
                    int(text(g, "remapped_rows/remapped_row_failure") == "Yes"))
    gpu_util = integer(g, "utilization/gpu_util")
    mem_util = integer(g, "utilization/memory_util")
    power = number(g, "power_readings/power_draw", "gpu_power_readings/power_draw",
                   "gpu_power_readings/average_power_draw")
    limit = number(g, "power_readings/enforced_power_limit",
                   "gpu_power_readings/current_power_limit")
    return FakeGpu(
        uuid=text(g, "uuid") or "", name=text(g, "product_name") or "",
        memory_total=int(number(g, "fb_memory_usage/total") or 0) * MIB,
        memory_used=int(number(g, "fb_memory_usage/used") or 0) * MIB,
        utilization=None if gpu_util is None or mem_util is None else (gpu_util, mem_util),
        temperature=integer(g, "temperature/gpu_temp") or 0,
        power_mw=None if power is None else round(power * 1000),
        limit_mw=None if limit is None else round(limit * 1000),
        sm_clock=integer(g, "clocks/sm_clock") or 0,
        sm_clock_max=integer(g, "max_clocks/sm_clock") or 0,
        reasons=reasons, ecc=ecc, retired=retired, remapped=remapped,
        replay=integer(g, "pci/replay_counter") or 0,
    )


@dataclass(frozen=True)
class FakeHandle:
    index: int


@dataclass(frozen=True)
class Reading:
    """Stands in for NVML's result structs: only the attributes the collector reads."""

    gpu: int = 0
    memory: int = 0
    total: int = 0
    used: int = 0
    device: Any = None
    eventType: int = 0
    eventData: int = 0


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # builds the matching subclass, e.g. NVMLError_GpuIsLost


@dataclass
class FakeNvml:
    gpus: list[FakeGpu]
    pending_events: deque[Reading] = field(default_factory=deque)
    registered: dict[int, int] = field(default_factory=dict)
    initialised: bool = False
    freed: bool = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    def gpu(self, handle: FakeHandle) -> FakeGpu:
        board = self.gpus[handle.index]
        if board.lost:
            raise nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return board

    @staticmethod
    def reported(value: Any) -> Any:
        if value is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        return FakeHandle(index)

    def nvmlDeviceGetUUID(self, h: FakeHandle) -> str:
        return self.gpu(h).uuid

    def nvmlDeviceGetName(self, h: FakeHandle) -> str:
        return self.gpu(h).name

    def nvmlDeviceGetMemoryInfo(self, h: FakeHandle, version: int | None = None) -> Reading:
        return Reading(total=self.gpu(h).memory_total, used=self.gpu(h).memory_used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeHandle) -> Reading:
        gpu, memory = self.reported(self.gpu(h).utilization)
        return Reading(gpu=gpu, memory=memory)

    def nvmlDeviceGetTemperatureV(self, h: FakeHandle, sensor: int, version: int = 0) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self.gpu(h).temperature

    def nvmlDeviceGetPowerUsage(self, h: FakeHandle) -> int:
        return int(self.reported(self.gpu(h).power_mw))

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeHandle) -> int:
        return int(self.reported(self.gpu(h).limit_mw))

    def nvmlDeviceGetClockInfo(self, h: FakeHandle, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self.gpu(h).sm_clock

    def nvmlDeviceGetMaxClockInfo(self, h: FakeHandle, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self.gpu(h).sm_clock_max

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeHandle) -> int:
        return self.gpu(h).reasons

    def nvmlDeviceGetTotalEccErrors(self, h: FakeHandle, kind: int, counter: int) -> int:
        assert counter == pynvml.NVML_VOLATILE_ECC
        corrected, uncorrected = self.reported(self.gpu(h).ecc)
        return int(corrected if kind == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else uncorrected)

    def nvmlDeviceGetRetiredPages(self, h: FakeHandle, cause: int) -> list[int]:
        single, double, _ = self.reported(self.gpu(h).retired)
        multiple_single = pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        return list(single if cause == multiple_single else double)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: FakeHandle) -> int:
        return int(self.reported(self.gpu(h).retired)[2])

    def nvmlDeviceGetRemappedRows(self, h: FakeHandle) -> tuple[int, int, int, int]:
        return tuple(self.reported(self.gpu(h).remapped))

    def nvmlDeviceGetPcieReplayCounter(self, h: FakeHandle) -> int:
        return self.gpu(h).replay

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceGetSupportedEventTypes(self, h: FakeHandle) -> int:
        self.gpu(h)
        return int(pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypePState
                   | pynvml.nvmlEventTypeSingleBitEccError | pynvml.nvmlEventTypeDoubleBitEccError)

    def nvmlDeviceRegisterEvents(self, h: FakeHandle, types: int, event_set: str) -> None:
        assert event_set == "event-set"
        self.registered[h.index] = types

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> Reading:
        assert timeout_ms == 0, "a tick must never block on the event set"
        if not self.pending_events:
            raise nvml_error(pynvml.NVML_ERROR_TIMEOUT)
        return self.pending_events.popleft()

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.freed = True

    def xid(self, gpu: int, xid: int) -> None:
        self.pending_events.append(Reading(device=FakeHandle(gpu), eventData=xid,
                                           eventType=pynvml.nvmlEventTypeXidCriticalError))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml([from_dump(name) for name in BOARDS])
    nvml.install(monkeypatch)
    return nvml


@pytest.fixture
def collector(fake: FakeNvml) -> NvmlCollector:
    return NvmlCollector.open("gpu-host-1", clock=lambda: 1_700_000_000.0)


def by_kind(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


def test_it_is_a_gpu_collector_with_an_inventory(collector: NvmlCollector) -> None:
    assert isinstance(collector, GpuCollector)
    assert collector.name == "nvml"
    inventory = collector.inventory()
    assert [g.index for g in inventory] == [0, 1, 2, 3]
    assert inventory[0].name == "NVIDIA A100-SXM4-80GB"
    assert inventory[0].uuid == "GPU-513536b6-7d19-9063-b049-1e69664bb298"
    assert inventory[0].memory_total_bytes == 81920 * MIB


async def test_samples_carry_the_dumps_values_in_the_messages_units(
        fake: FakeNvml, collector: NvmlCollector) -> None:
    gpus = (await collector.collect()).gpus
    assert gpus is not None
    a100 = gpus[0]
    assert a100.memory_total_bytes == 81920 * 1024 * 1024
    assert a100.memory_used_bytes == 50 * 1024 * 1024
    assert a100.power_w == pytest.approx(67.03)  # mW from NVML, W on the wire
    assert a100.power_limit_w == 500.0
    assert (a100.temperature_c, a100.sm_clock_mhz, a100.sm_clock_max_mhz) == (27.0, 1275, 1410)
    for sample, board in zip(gpus, fake.gpus, strict=True):
        assert sample.healthy
        assert sample.error is None
        assert (sample.uuid, sample.name) == (board.uuid, board.name)
        assert sample.memory_total_bytes == board.memory_total
        assert sample.temperature_c == board.temperature
        assert sample.power_w == pytest.approx((board.power_mw or 0) / 1000)
        assert sample.power_limit_w == pytest.approx((board.limit_mw or 0) / 1000)
        assert sample.sm_clock_max_mhz == board.sm_clock_max
        assert sample.pcie_replay_count == 0
    assert [g.power_limit_w for g in gpus] == [500.0, 300.0, 70.0, 70.0]
    assert gpus[3].power_w == pytest.approx(8.81)  # v13 dump: average_power_draw


async def test_what_a_board_does_not_report_is_none(collector: NvmlCollector) -> None:
    a100, a10g, t4, rtx = (await collector.collect()).gpus or []
    # The A100 dump was taken in MIG mode: no whole-GPU utilisation, no remapped rows.
    assert a100.utilization_gpu_pct is None
    assert a100.utilization_memory_pct is None
    assert a100.remapped_rows_correctable is None
    assert a100.retired_pages is None
    assert (a100.ecc_corrected_total, a100.ecc_uncorrected_total) == (0, 0)
    # Ampere: row remapping, no page retirement.
    assert (a10g.remapped_rows_correctable, a10g.remapped_rows_uncorrectable) == (0, 0)
    assert (a10g.remapped_rows_pending, a10g.remapped_rows_failure) == (False, False)
    assert a10g.retired_pages is None
    assert a10g.retired_pages_pending is None
    assert a10g.utilization_gpu_pct == 0.0
    # Turing: page retirement, no row remapping.
    assert (t4.retired_pages, t4.retired_pages_pending) == (0, False)
    assert t4.remapped_rows_correctable is None
    assert t4.remapped_rows_pending is None
    # ECC off on the RTX 4000 SFF Ada: no counters, yet the row remapper answers.
    assert rtx.ecc_corrected_total is None
    assert rtx.ecc_uncorrected_total is None
    assert rtx.remapped_rows_uncorrectable == 0
    assert rtx.utilization_memory_pct == 37.0


async def test_clock_event_reasons_are_decoded_into_names(collector: NvmlCollector) -> None:
    a100, a10g, t4, rtx = (await collector.collect()).gpus or []
    assert a100.throttle_reasons == []
    assert t4.throttle_reasons == []
    assert a10g.throttle_reasons == ["gpu_idle"]
    assert rtx.throttle_reasons == ["gpu_idle"]
    every = sum(REASON_BITS.values())
    assert set(decode_throttle_reasons(every)) == set(REASON_BITS)
    assert set(REASON_BITS) <= set(THROTTLE_REASON_NAMES)
    assert decode_throttle_reasons(pynvml.nvmlClocksEventReasonSwPowerCap | 1 << 40) == [
        "sw_power_cap", f"unknown_0x{1 << 40:x}"]


async def test_a_lost_gpu_is_unhealthy_alone_and_reported_once(
        fake: FakeNvml, collector: NvmlCollector) -> None:
    fake.gpus[1].lost = True
    first, second = await collector.collect(), await collector.collect()
    assert first.gpus is not None
    assert second.gpus is not None
    lost = first.gpus[1]
    assert (lost.index, lost.uuid, lost.healthy, lost.error) == (
        1, fake.gpus[1].uuid, False, "GPU is lost")
    assert lost.temperature_c is None
    assert lost.memory_total_bytes is None
    assert all(g.healthy and g.temperature_c is not None for i, g in enumerate(first.gpus)
               if i != 1)
    (event,) = by_kind(first.events + second.events, "gpu_lost")
    assert (event.gpu, event.severity, event.host) == (1, "critical", "gpu-host-1")
    assert event.data["error"] == "GPU is lost"

    fake.gpus[1].lost = False
    back = await collector.collect()
    assert back.gpus is not None
    assert back.gpus[1].healthy
    (recovered,) = by_kind(back.events, "gpu_recovered")
    assert recovered.gpu == 1
    assert not by_kind((await collector.collect()).events, "gpu_recovered")


async def test_a_gpu_lost_before_start_is_listed_and_unhealthy(
        fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.gpus[2].lost = True
    collector = NvmlCollector.open("gpu-host-1")
    assert [g.index for g in collector.inventory()] == [0, 1, 2, 3]
    gpus = (await collector.collect()).gpus or []
    assert [g.healthy for g in gpus] == [True, True, False, True]
    fake.gpus[2].lost = False
    gpus = (await collector.collect()).gpus or []
    assert gpus[2].healthy
    assert gpus[2].uuid == fake.gpus[2].uuid
    assert 2 in fake.registered  # registered for XIDs once it answered


async def test_xids_arrive_through_the_event_set_once(
        fake: FakeNvml, collector: NvmlCollector) -> None:
    for index in range(4):
        assert fake.registered[index] & pynvml.nvmlEventTypeXidCriticalError
        assert not fake.registered[index] & pynvml.nvmlEventTypePState
    fake.xid(2, 79)
    fake.xid(0, 13)
    events = by_kind((await collector.collect()).events, "xid")
    assert [(e.gpu, e.data, e.severity) for e in events] == [
        (2, {"xid": 79}, "critical"), (0, {"xid": 13}, "warning")]
    assert "fallen off the bus" in events[0].message
    assert events[0].ts == 1_700_000_000.0
    assert not by_kind((await collector.collect()).events, "xid")


async def test_ecc_error_events_are_told_apart(fake: FakeNvml, collector: NvmlCollector) -> None:
    fake.pending_events.extend([
        Reading(device=FakeHandle(1), eventType=pynvml.nvmlEventTypeDoubleBitEccError),
        Reading(device=FakeHandle(1), eventType=pynvml.nvmlEventTypeSingleBitEccError),
        Reading(device=FakeHandle(1), eventType=pynvml.nvmlEventTypePState),
    ])
    events = (await collector.collect()).events
    assert [(e.kind, e.gpu, e.severity) for e in events] == [
        ("ecc_double_bit", 1, "critical"), ("ecc_single_bit", 1, "warning")]


async def test_a_rise_in_uncorrected_ecc_is_an_event(
        fake: FakeNvml, collector: NvmlCollector) -> None:
    assert not by_kind((await collector.collect()).events, "ecc_uncorrected")
    fake.gpus[1].ecc = (4, 2)
    (event,) = by_kind((await collector.collect()).events, "ecc_uncorrected")
    assert (event.gpu, event.severity, event.data["count"], event.data["total"]) == (
        1, "critical", 2, 2)
    assert not by_kind((await collector.collect()).events, "ecc_uncorrected")


async def test_older_drivers_answer_through_the_older_functions(
        fake: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperatureV", missing)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", missing)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature",
                        lambda h, sensor: fake.gpu(h).temperature)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons",
                        lambda h: fake.gpu(h).reasons)
    gpus = (await NvmlCollector.open("old-host").collect()).gpus or []
    assert [g.temperature_c for g in gpus] == [27.0, 17.0, 40.0, 38.0]
    assert gpus[1].throttle_reasons == ["gpu_idle"]


async def test_close_frees_the_event_set_and_shuts_nvml_down(
        fake: FakeNvml, collector: NvmlCollector) -> None:
    assert fake.initialised
    await collector.close()
    await collector.close()
    assert fake.freed
    assert not fake.initialised


@pytest.mark.parametrize(("code", "says"), [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver not loaded"),
    (pynvml.NVML_ERROR_UNKNOWN, "NVML failed to initialise: Unknown Error"),
])
def test_nvml_that_cannot_start_says_why(
        monkeypatch: pytest.MonkeyPatch, code: int, says: str) -> None:
    def refuse() -> None:
        raise nvml_error(code)

    monkeypatch.setattr(pynvml, "nvmlInit", refuse)
    with pytest.raises(NvmlUnavailable, match=says):
        NvmlCollector.open("gpu-host-1")


async def test_real_pynvml_on_this_host() -> None:
    """Unfaked: without a driver (CI, this machine) NVML is unavailable, and says so."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        with pytest.raises(NvmlUnavailable, match=r"^NVML library not found \(no libnvidia-ml"):
            NvmlCollector.open("no-gpu-host")
        return
    outcome: NvmlCollector | NvmlUnavailable
    try:  # a host with the driver: either it works or it says why not
        outcome = NvmlCollector.open("gpu-host")
    except NvmlUnavailable as exc:
        outcome = exc
    if isinstance(outcome, NvmlCollector):
        assert outcome.inventory()
        assert (await outcome.collect()).gpus
        await outcome.close()
    else:
        assert str(outcome)


def reported_fields(sample: GpuSample) -> set[str]:
    return {f for f in sample.__struct_fields__ if getattr(sample, f) is not None}


@pytest.mark.parametrize(("board", "profile", "mig_only"), [
    (0, "a100-sxm4-80gb", {"utilization_gpu_pct", "utilization_memory_pct",
                           "remapped_rows_correctable", "remapped_rows_uncorrectable",
                           "remapped_rows_pending", "remapped_rows_failure"}),
    (1, "a10g", set()),
    (2, "t4", set()),
    (3, "rtx-4000-sff-ada", set()),
])
async def test_the_simulator_reports_what_the_real_board_reports(
        collector: NvmlCollector, board: int, profile: str, mig_only: set[str]) -> None:
    real = ((await collector.collect()).gpus or [])[board]
    simulated = ((await SimulatedGpuCollector("sim", count=1, profile=profile,
                                              clock=lambda: 0.0).collect()).gpus or [])[0]
    # The A100 dump is in MIG mode; the profile simulates the board with MIG off.
    assert reported_fields(simulated) == reported_fields(real) | mig_only


async def test_a_hung_nvml_read_is_not_stacked_and_its_events_are_kept(
        fake: FakeNvml, collector: NvmlCollector, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from llm_ops_helper.agent.collectors.base import run_collectors

    release = threading.Event()
    calls = []
    answer = fake.nvmlDeviceGetPcieReplayCounter

    def hangs(h: FakeHandle) -> int:
        calls.append(h.index)
        if h.index == 1:
            release.wait(10)  # the driver stuck on GPU 1
        return answer(h)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetPcieReplayCounter", hangs)
    fake.xid(3, 79)  # drained by the read that hangs, after it returns
    first = await run_collectors([collector], timeout_s=0.2)
    assert "timed out" in (first.stats[0].error or "")
    second = await run_collectors([collector], timeout_s=0.2)
    assert "previous NVML read has not returned" in (second.stats[0].error or "")
    assert calls.count(1) == 1, "a second read was started beside the hung one"
    release.set()
    assert collector._reading is not None
    await asyncio.wait_for(asyncio.shield(collector._reading), 5)  # the stuck read returns
    third = await run_collectors([collector], timeout_s=2.0)
    assert third.stats[0].ok
    assert [(e.gpu, e.data) for e in by_kind(third.collected.events, "xid")] == [(3, {"xid": 79})]
