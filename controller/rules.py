"""Alert rules for what needs no learning: plain functions from a snapshot to conditions.

A rule returns the :class:`Condition` s that hold *now*; the alert manager turns "holds now"
into fired / resolved. Rules that need a little memory (how long a GPU has been throttling)
keep it in a :class:`HostRuleState` that the caller owns and passes in, so every decision is a
function of its inputs and reads the same in a test as in the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_ops_helper.controller.config import RulesConfig
from llm_ops_helper.controller.fleet import HostState, OfflineReason
from llm_ops_helper.proto.messages import Event, GpuSample, Severity, Telemetry

# Clock-event reasons that mean the GPU is held back by heat or by its power delivery, not by
# a cap an operator chose (sw_power_cap under full load is normal for a busy inference GPU).
THROTTLE_REASONS = frozenset({"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
                              "sw_thermal_slowdown"})


@dataclass(frozen=True, slots=True)
class Condition:
    """Something wrong that holds now. ``key`` de-duplicates it across evaluations."""

    rule: str
    severity: Severity
    host: str
    summary: str
    gpu: int | None = None
    replica: str | None = None
    series: str | None = None
    value: float | None = None

    @property
    def key(self) -> str:
        return "|".join((self.rule, self.host, _str(self.gpu), self.replica or "",
                         self.series or ""))


def _str(x: int | None) -> str:
    return "" if x is None else str(x)


@dataclass
class HostRuleState:
    # GPU index -> wall time its thermal/power throttling began (absent: not throttling).
    throttled_since: dict[int, float] = field(default_factory=dict)


def gpu_conditions(host: str, gpu: GpuSample, ts: float, state: HostRuleState,
                   rules: RulesConfig) -> list[Condition]:
    out: list[Condition] = []
    i = gpu.index
    if not gpu.healthy:
        out.append(Condition("gpu_unhealthy", "critical", host, gpu=i,
                             summary=f"GPU {i} does not answer: {gpu.error or 'unknown error'}"))
        state.throttled_since.pop(i, None)
        return out  # its other fields are not readings
    t = gpu.temperature_c
    if t is not None and t > rules.gpu_temperature_max_c:
        out.append(Condition("gpu_temperature_high", "warning", host, gpu=i, value=t,
                             summary=f"GPU {i} at {t:.0f} C, above the "
                                     f"{rules.gpu_temperature_max_c:.0f} C limit"))
    if gpu.ecc_uncorrected_total:
        out.append(Condition("gpu_ecc_uncorrected", "critical", host, gpu=i,
                             value=float(gpu.ecc_uncorrected_total),
                             summary=f"GPU {i} has {gpu.ecc_uncorrected_total} uncorrected ECC "
                                     "error(s) since the driver loaded: drain and reset it"))
    if gpu.remapped_rows_failure:
        out.append(Condition("gpu_row_remap_failed", "critical", host, gpu=i,
                             summary=f"GPU {i} failed to remap a memory row: replace it"))
    held_back = THROTTLE_REASONS.intersection(gpu.throttle_reasons)
    if held_back:
        since = state.throttled_since.setdefault(i, ts)
        if ts - since >= rules.throttle_sustained_s:
            out.append(Condition("gpu_throttled", "warning", host, gpu=i, value=ts - since,
                                 summary=f"GPU {i} throttled ({', '.join(sorted(held_back))}) "
                                         f"for {ts - since:.0f} s"))
    else:
        state.throttled_since.pop(i, None)
    return out


def replica_conditions(host: HostState, ts: float, rules: RulesConfig) -> list[Condition]:
    out: list[Condition] = []
    for replica in host.replicas.values():
        starting = ts - replica.started_at < rules.replica_startup_grace_s
        recent = sum(1 for t in replica.restarts if ts - t <= rules.replica_restarts_window_s)
        if recent >= rules.replica_restarts_max:
            out.append(Condition(
                "replica_restarting", "critical", host.host, replica=replica.name,
                value=float(recent), summary=f"replica {replica.name} restarted {recent} times "
                f"in {rules.replica_restarts_window_s:.0f} s"))
        if not replica.up and not starting:
            out.append(Condition("replica_down", "warning", host.host, replica=replica.name,
                                 summary=f"replica {replica.name} ({replica.runtime}) does not "
                                         "answer its metrics endpoint"))
    return out


def telemetry_conditions(host: HostState, telemetry: Telemetry, state: HostRuleState,
                         rules: RulesConfig) -> list[Condition]:
    """Every telemetry-driven condition that holds for ``host`` at this snapshot."""
    out: list[Condition] = []
    for gpu in telemetry.gpus:
        out += gpu_conditions(telemetry.host, gpu, telemetry.ts, state, rules)
    out += replica_conditions(host, telemetry.ts, rules)
    return out


def event_condition(event: Event, rules: RulesConfig) -> Condition | None:
    """An event that raises an alert held for ``xid_hold_s`` after the last one, or None."""
    if event.kind != "xid":
        return None
    xid = event.data.get("xid")
    if not isinstance(xid, int) or xid not in rules.critical_xids:
        return None
    where = f"GPU {event.gpu}" if event.gpu is not None else "a GPU"
    return Condition("gpu_xid", "critical", event.host, gpu=event.gpu, series=f"xid{xid}",
                     value=float(xid), summary=event.message or f"XID {xid} on {where}")


def host_offline_condition(host: str, reason: OfflineReason | None) -> Condition | None:
    """A host that vanished (Last Will or silence) is an alert; a clean stop is not."""
    if reason in ("lost", "stale"):
        why = ("its broker connection was lost" if reason == "lost"
               else "it stopped sending telemetry")
        return Condition("host_offline", "critical", host, summary=f"{host} is offline: {why}")
    return None
