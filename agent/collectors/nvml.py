"""GPU telemetry and XID events from NVML, through ``pynvml`` (the nvidia-ml-py distribution).

Every NVML call blocks, so a tick's calls run together in one worker thread. A field the board
does not report (``NVMLError_NotSupported``, nvidia-smi's ``N/A``) is ``None``; any other NVML
error on a GPU marks that GPU unhealthy for the tick and the others go on. The events both GPU
collectors emit (gpu_lost, gpu_recovered, xid, ecc_uncorrected) are built here, so the
simulated collector speaks exactly as this one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

from llm_ops_helper.agent.collectors.base import Collected
from llm_ops_helper.proto.messages import CRITICAL_XIDS, Event, GpuInfo, GpuSample, Severity

_T = TypeVar("_T")


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this host; the message says why."""


XID_DESCRIPTIONS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after a previous fault",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def xid_severity(xid: int) -> Severity:
    return "critical" if xid in CRITICAL_XIDS else "warning"


def xid_event(host: str, ts: float, gpu: int | None, xid: int) -> Event:
    where = f"GPU {gpu}" if gpu is not None else "an unknown GPU"
    what = XID_DESCRIPTIONS.get(xid, "see NVIDIA's XID catalog")
    return Event(host=host, ts=ts, kind="xid", severity=xid_severity(xid), gpu=gpu,
                 message=f"XID {xid} on {where}: {what}", data={"xid": xid})


def _reason_bit(suffix: str) -> int:
    # nvidia-ml-py 12.535+ renamed "ClocksThrottleReason" to "ClocksEventReason"; take either.
    value: int | None = getattr(pynvml, f"nvmlClocksEventReason{suffix}", None)
    if value is None:
        value = getattr(pynvml, f"nvmlClocksThrottleReason{suffix}", 0)
    return int(value or 0)


# In bit order, named as nvidia-smi names them (its clocks_event_reason_* elements).
THROTTLE_REASONS: tuple[tuple[int, str], ...] = tuple(
    (bit, name)
    for bit, name in (
        (_reason_bit("GpuIdle"), "gpu_idle"),
        (_reason_bit("ApplicationsClocksSetting"), "applications_clocks_setting"),
        (_reason_bit("SwPowerCap"), "sw_power_cap"),
        (_reason_bit("HwSlowdown"), "hw_slowdown"),
        (_reason_bit("SyncBoost"), "sync_boost"),
        (_reason_bit("SwThermalSlowdown"), "sw_thermal_slowdown"),
        (_reason_bit("HwThermalSlowdown"), "hw_thermal_slowdown"),
        (_reason_bit("HwPowerBrakeSlowdown"), "hw_power_brake_slowdown"),
        (_reason_bit("DisplayClockSetting"), "display_clocks_setting"),
        (_reason_bit("BoardLimit"), "board_limit"),
        (_reason_bit("Reliability"), "reliability"),
    )
    if bit
)
THROTTLE_REASON_NAMES: tuple[str, ...] = tuple(name for _, name in THROTTLE_REASONS)
_KNOWN_REASON_BITS = sum(bit for bit, _ in THROTTLE_REASONS)


def decode_throttle_reasons(mask: int) -> list[str]:
    """NVML's clock-event bitmask as names; bits this table does not know as ``unknown_0x..``."""
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    if rest := mask & ~_KNOWN_REASON_BITS:
        names.append(f"unknown_0x{rest:x}")
    return names


class GpuEventTracker:
    """Turns successive samples into events: health transitions and uncorrected-ECC rises."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._healthy: dict[int, bool] = {}
        self._uncorrected: dict[int, int] = {}

    def observe(self, samples: Iterable[GpuSample], ts: float) -> list[Event]:
        events: list[Event] = []
        for s in samples:
            was_healthy = self._healthy.get(s.index, True)
            self._healthy[s.index] = s.healthy
            data: dict[str, str | int | float | bool | None] = {"uuid": s.uuid}
            if was_healthy and not s.healthy:
                events.append(Event(host=self.host, ts=ts, kind="gpu_lost", severity="critical",
                                    gpu=s.index, data={**data, "error": s.error},
                                    message=f"GPU {s.index} is unhealthy: {s.error}"))
            elif s.healthy and not was_healthy:
                events.append(Event(host=self.host, ts=ts, kind="gpu_recovered", gpu=s.index,
                                    data=data, message=f"GPU {s.index} answers again"))
            total = s.ecc_uncorrected_total
            if total is None:
                continue  # keep the last count, so a rise across an outage is still seen
            before = self._uncorrected.get(s.index)
            self._uncorrected[s.index] = total
            if before is not None and total > before:
                events.append(Event(
                    host=self.host, ts=ts, kind="ecc_uncorrected", severity="critical",
                    gpu=s.index, data={**data, "count": total - before, "total": total},
                    message=f"GPU {s.index}: {total - before} new uncorrected ECC error(s)"))
        return events


# Errors that mean "this board does not report that": the field is None, the GPU is fine.
_ABSENT_CODES = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_DATA,
    pynvml.NVML_ERROR_NO_PERMISSION,
})

_INIT_FAILURES: dict[int, str] = {
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        "NVML library not found (no libnvidia-ml.so.1: no NVIDIA driver on this host)",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        "NVIDIA driver not loaded (the nvidia kernel module is not running)",
    pynvml.NVML_ERROR_NO_PERMISSION:
        "no permission to use NVML (check access to /dev/nvidia*)",
    pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        "NVML library and kernel driver versions differ (driver updated without a reboot?)",
}

_XID = int(pynvml.nvmlEventTypeXidCriticalError)
_SINGLE_BIT = int(pynvml.nvmlEventTypeSingleBitEccError)
_DOUBLE_BIT = int(pynvml.nvmlEventTypeDoubleBitEccError)
_MAX_EVENTS_PER_TICK = 1000  # an XID storm must not hold a tick forever


def _optional(read: Callable[[], _T]) -> _T | None:
    try:
        return read()
    except pynvml.NVMLError as exc:
        if exc.value in _ABSENT_CODES:
            return None
        raise


def _first_available(*reads: Callable[[], _T]) -> _T:
    """The first read whose NVML function exists: newer API first, older drivers after."""
    for read in reads[:-1]:
        try:
            return read()
        except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_ArgumentVersionMismatch,
                AttributeError):
            continue
    return reads[-1]()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle_key(handle: Any) -> object:
    # Real handles are ctypes pointers: equal devices compare equal only by address.
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (ctypes.ArgumentError, TypeError):
        return handle


def _memory(handle: Any) -> tuple[int, int]:
    # v2 matches nvidia-smi: "used" excludes the driver's reserved memory.
    info = _first_available(
        lambda: pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2),
        lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
    return int(info.total), int(info.used)


def _temperature(handle: Any) -> float:
    sensor = pynvml.NVML_TEMPERATURE_GPU
    return float(_first_available(lambda: pynvml.nvmlDeviceGetTemperatureV(handle, sensor),
                                  lambda: pynvml.nvmlDeviceGetTemperature(handle, sensor)))


def _reasons(handle: Any) -> list[str]:
    return decode_throttle_reasons(int(_first_available(
        lambda: pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
        lambda: pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))))


def _ecc(handle: Any, kind: int) -> int:
    return int(pynvml.nvmlDeviceGetTotalEccErrors(handle, kind, pynvml.NVML_VOLATILE_ECC))


def _retired_pages(handle: Any) -> int:
    causes = (pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
              pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
    return sum(len(pynvml.nvmlDeviceGetRetiredPages(handle, cause)) for cause in causes)


@dataclass(slots=True)
class _Device:
    index: int
    handle: Any = None
    uuid: str = ""
    name: str = ""
    memory_total_bytes: int | None = None
    error: str | None = None

    def attach(self) -> bool:
        """Get handle and identity unless we have them; False (and ``error``) if NVML says no."""
        if self.handle is not None:
            return True
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            self.name = _text(pynvml.nvmlDeviceGetName(handle))
        except pynvml.NVMLError as exc:
            self.error = str(exc)
            return False
        self.handle, self.error = handle, None
        with contextlib.suppress(pynvml.NVMLError):
            self.memory_total_bytes = _memory(handle)[0]
        return True

    def sample(self) -> GpuSample:
        if not self.attach():
            return GpuSample(index=self.index, uuid=self.uuid, name=self.name, healthy=False,
                             error=self.error)
        try:
            return self._read()
        except pynvml.NVMLError as exc:
            return GpuSample(index=self.index, uuid=self.uuid, name=self.name, healthy=False,
                             error=str(exc))

    def _read(self) -> GpuSample:
        h = self.handle
        util = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(h))
        memory = _optional(lambda: _memory(h))
        power_mw = _optional(lambda: int(pynvml.nvmlDeviceGetPowerUsage(h)))
        limit_mw = _optional(lambda: int(pynvml.nvmlDeviceGetEnforcedPowerLimit(h)))
        remapped = _optional(lambda: pynvml.nvmlDeviceGetRemappedRows(h))
        if memory is not None:
            self.memory_total_bytes = memory[0]
        return GpuSample(
            index=self.index, uuid=self.uuid, name=self.name,
            utilization_gpu_pct=None if util is None else float(util.gpu),
            utilization_memory_pct=None if util is None else float(util.memory),
            memory_total_bytes=None if memory is None else memory[0],
            memory_used_bytes=None if memory is None else memory[1],
            temperature_c=_optional(lambda: _temperature(h)),
            power_w=None if power_mw is None else power_mw / 1000,
            power_limit_w=None if limit_mw is None else limit_mw / 1000,
            sm_clock_mhz=_optional(lambda: int(pynvml.nvmlDeviceGetClockInfo(
                h, pynvml.NVML_CLOCK_SM))),
            sm_clock_max_mhz=_optional(lambda: int(pynvml.nvmlDeviceGetMaxClockInfo(
                h, pynvml.NVML_CLOCK_SM))),
            throttle_reasons=_optional(lambda: _reasons(h)) or [],
            ecc_corrected_total=_optional(
                lambda: _ecc(h, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)),
            ecc_uncorrected_total=_optional(
                lambda: _ecc(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)),
            retired_pages=_optional(lambda: _retired_pages(h)),
            retired_pages_pending=_optional(
                lambda: bool(pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h))),
            remapped_rows_correctable=None if remapped is None else int(remapped[0]),
            remapped_rows_uncorrectable=None if remapped is None else int(remapped[1]),
            remapped_rows_pending=None if remapped is None else bool(remapped[2]),
            remapped_rows_failure=None if remapped is None else bool(remapped[3]),
            pcie_replay_count=_optional(lambda: int(pynvml.nvmlDeviceGetPcieReplayCounter(h))),
        )


class NvmlHung(RuntimeError):
    """The previous tick's NVML read is still blocked in the driver."""


_Blocking = tuple[list[GpuSample], list[tuple[int | None, int, int]]]


class NvmlCollector:
    """Samples every GPU NVML sees. Build it with :meth:`open`."""

    name = "nvml"

    def __init__(self, host: str, devices: list[_Device], event_set: Any,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._devices = devices
        self._event_set = event_set
        self._registered: set[int] = set()
        self._clock = clock
        self._tracker = GpuEventTracker(host)
        self._closed = False
        # The NVML read of the tick before, while it has not been consumed (see collect()).
        self._reading: asyncio.Future[_Blocking] | None = None
        self._reading_since = 0.0
        for device in devices:
            self._register_events(device)

    @classmethod
    def open(cls, host: str, *, clock: Callable[[], float] = time.time) -> NvmlCollector:
        """Initialise NVML and enumerate the GPUs, or raise :class:`NvmlUnavailable`."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            reason = _INIT_FAILURES.get(exc.value, f"NVML failed to initialise: {exc}")
            raise NvmlUnavailable(reason) from exc
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            _shutdown()
            raise NvmlUnavailable(f"NVML initialised but could not count GPUs: {exc}") from exc
        if count == 0:
            _shutdown()
            raise NvmlUnavailable("NVML initialised but sees no GPUs")
        devices = [_Device(index=i) for i in range(count)]
        for device in devices:
            device.attach()
        try:
            event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError:
            event_set = None  # no XID events on this platform; telemetry still works
        return cls(host, devices, event_set, clock)

    def inventory(self) -> list[GpuInfo]:
        return [GpuInfo(index=d.index, uuid=d.uuid, name=d.name,
                        memory_total_bytes=d.memory_total_bytes) for d in self._devices]

    async def collect(self) -> Collected:
        # A GPU falling off the bus can hang NVML calls for seconds or for good. The tick's
        # timeout abandons the wait, not the thread: never start a second read beside a hung
        # one (threads would pile up), and keep what a late read drained from the event set.
        late: list[tuple[int | None, int, int]] = []
        if self._reading is not None:
            if not self._reading.done():
                stuck = time.monotonic() - self._reading_since
                raise NvmlHung(f"the previous NVML read has not returned for {stuck:.1f} s "
                               "(a GPU or the driver is hung)")
            if self._reading.exception() is None:
                late = self._reading.result()[1]
        self._reading = asyncio.ensure_future(asyncio.to_thread(self._collect_blocking))
        self._reading_since = time.monotonic()
        samples, raw = await asyncio.shield(self._reading)
        self._reading = None
        raw = late + raw
        ts = self._clock()
        events = [self._nvml_event(ts, gpu, kind, data) for gpu, kind, data in raw]
        events.extend(self._tracker.observe(samples, ts))
        return Collected(gpus=samples, events=events)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_blocking)

    def _collect_blocking(self) -> _Blocking:
        samples = [device.sample() for device in self._devices]
        for device in self._devices:
            self._register_events(device)
        return samples, self._drain_events()

    def _register_events(self, device: _Device) -> None:
        if self._event_set is None or device.handle is None or device.index in self._registered:
            return
        try:
            supported = int(pynvml.nvmlDeviceGetSupportedEventTypes(device.handle))
            wanted = supported & (_XID | _SINGLE_BIT | _DOUBLE_BIT)
            if wanted:
                pynvml.nvmlDeviceRegisterEvents(device.handle, wanted, self._event_set)
        except pynvml.NVMLError:
            return  # retried next tick; a lost GPU will be reported by its samples
        self._registered.add(device.index)

    def _drain_events(self) -> list[tuple[int | None, int, int]]:
        if self._event_set is None:
            return []
        by_handle = {_handle_key(d.handle): d.index for d in self._devices if d.handle is not None}
        drained: list[tuple[int | None, int, int]] = []
        for _ in range(_MAX_EVENTS_PER_TICK):
            try:
                data = pynvml.nvmlEventSetWait_v2(self._event_set, 0)
            except pynvml.NVMLError:
                # Timeout means "drained". Anything else (a GPU gone from the set) ends this
                # tick's draining; the GPU's own samples report what went wrong.
                break
            kind = int(data.eventType)
            if kind & (_XID | _SINGLE_BIT | _DOUBLE_BIT):
                gpu = by_handle.get(_handle_key(data.device))
                drained.append((gpu, kind, int(data.eventData)))
        return drained

    def _nvml_event(self, ts: float, gpu: int | None, kind: int, data: int) -> Event:
        if kind & _XID:
            return xid_event(self.host, ts, gpu, data)
        double = bool(kind & _DOUBLE_BIT)
        return Event(host=self.host, ts=ts, gpu=gpu,
                     kind="ecc_double_bit" if double else "ecc_single_bit",
                     severity="critical" if double else "warning",
                     message=f"{'double' if double else 'single'}-bit ECC error on GPU {gpu}")

    def _close_blocking(self) -> None:
        if self._event_set is not None:
            # A lost GPU can make freeing fail; the process is leaving, nothing to recover.
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(self._event_set)
            self._event_set = None
        _shutdown()


def _shutdown() -> None:
    with contextlib.suppress(pynvml.NVMLError):
        pynvml.nvmlShutdown()
