"""Scripted GPU faults for the simulated collector: a TOML timeline relative to agent start.

```toml
[[events]]
at_s = 20
gpu = 3          # omit for every GPU
kind = "xid"
xid = 79
```

A file is read once into frozen typed entries; anything that does not fit raises
:class:`ScenarioError` naming the file, the entry and the key, and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec

from llm_ops_helper.agent.collectors.nvml import THROTTLE_REASON_NAMES
from llm_ops_helper.tomlfile import problem

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
PATTERNS: tuple[str, ...] = ("constant", "sine", "square", "idle")


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file, entry and key."""


class _Entry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
             tag_field="kind"):
    at_s: NonNegative
    # None: every GPU of the host.
    gpu: Count | None = None

    def applies_to(self, gpu: int) -> bool:
        return self.gpu is None or self.gpu == gpu


class Window(_Entry, frozen=True, kw_only=True):
    """An entry that holds for a while rather than happening once."""

    # How long the condition lasts; None: for good. Where two utilization or power entries
    # overlap on a GPU the later-starting one wins; throttle reasons add up.
    for_s: NonNegative | None = None

    def active(self, t: float) -> bool:
        return self.at_s <= t and (self.for_s is None or t < self.at_s + self.for_s)


class TemperatureRamp(_Entry, frozen=True, kw_only=True, tag="temperature_ramp"):
    """Drive the temperature linearly to ``to_c`` over ``over_s``, hold it ``hold_s`` (or on)."""

    to_c: float
    over_s: NonNegative = 0.0
    hold_s: NonNegative | None = None


class Xid(_Entry, frozen=True, kw_only=True, tag="xid"):
    xid: Annotated[int, msgspec.Meta(gt=0)]


class Ecc(_Entry, frozen=True, kw_only=True, tag="ecc"):
    """Add volatile ECC errors; uncorrected ones also remap a row or retire a page."""

    corrected: Count = 0
    uncorrected: Count = 0


class Disappear(Window, frozen=True, kw_only=True, tag="disappear"):
    """The GPU falls off the bus (every read fails "GPU is lost"), back after ``for_s``."""


class Utilization(Window, frozen=True, kw_only=True, tag="utilization"):
    pattern: str = "constant"
    level_pct: Annotated[float, msgspec.Meta(ge=0, le=100)] = 100.0
    period_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class Throttle(Window, frozen=True, kw_only=True, tag="throttle"):
    reasons: list[str]


class Power(Window, frozen=True, kw_only=True, tag="power"):
    """Enforce a lower power limit (as ``nvidia-smi -pl``): draw is capped, sw_power_cap shows."""

    limit_w: Annotated[float, msgspec.Meta(gt=0)]


class PcieReplay(_Entry, frozen=True, kw_only=True, tag="pcie_replay"):
    count: Annotated[int, msgspec.Meta(gt=0)]


ScenarioEvent = (
    TemperatureRamp | Xid | Ecc | Disappear | Utilization | Throttle | Power | PcieReplay)
KINDS: dict[str, type[_Entry]] = {
    str(t.__struct_config__.tag): t
    for t in (TemperatureRamp, Xid, Ecc, Disappear, Utilization, Throttle, Power, PcieReplay)
}


class _File(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    description: str = ""
    events: tuple[ScenarioEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    events: tuple[ScenarioEvent, ...] = ()
    description: str = ""
    # Where it was read from, for errors found later (an entry naming a GPU the host lacks).
    source: str = "<scenario>"

    def check_gpus(self, count: int) -> None:
        """Raise :class:`ScenarioError` for any entry naming a GPU index >= ``count``."""
        for i, entry in enumerate(self.events):
            if entry.gpu is not None and entry.gpu >= count:
                raise ScenarioError(f"{self.source}: events[{i}].gpu: GPU {entry.gpu} does not "
                                    f"exist (the host has {count}: 0..{count - 1})")


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_scenario(text, source=str(path))


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from exc
    try:
        parsed = msgspec.convert(raw, _File)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{source}: {_explain(exc, raw)}") from exc
    for i, entry in enumerate(parsed.events):
        if problem := _check(entry):
            raise ScenarioError(f"{source}: events[{i}].{problem}")
    return Scenario(events=parsed.events, description=parsed.description, source=source)


def _check(entry: ScenarioEvent) -> str | None:
    if isinstance(entry, Utilization) and entry.pattern not in PATTERNS:
        return (f"pattern: unknown pattern {entry.pattern!r} "
                f"(expected one of: {', '.join(PATTERNS)})")
    if isinstance(entry, Throttle):
        for j, reason in enumerate(entry.reasons):
            if reason not in THROTTLE_REASON_NAMES:
                return (f"reasons[{j}]: unknown throttle reason {reason!r} "
                        f"(expected one of: {', '.join(THROTTLE_REASON_NAMES)})")
    return None


def _explain(exc: msgspec.ValidationError, raw: dict[str, Any]) -> str:
    """"events[2].xid: expected int, got str", with the keys or kinds that would have fitted
    where that helps."""
    found = problem(exc)
    if found.kind == "missing_key":
        return f"{found.key}: missing required key"
    if found.kind == "unknown_key":
        allowed = _allowed_keys(found.key.rpartition(".")[0], raw)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{found.key}: unknown key{hint}"
    if found.key.endswith(".kind") and found.detail.startswith("invalid value"):
        kind = found.detail.removeprefix("invalid value ").strip()
        return f"{found.key}: unknown kind {kind} (expected one of: {', '.join(sorted(KINDS))})"
    return f"{found.key or '(top level)'}: {found.detail}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _allowed_keys(path: str, raw: dict[str, Any]) -> list[str]:
    if not path:
        return ["description", "events"]
    index = re.fullmatch(r"events\[(\d+)\]", path)
    events = raw.get("events")
    if index is None or not isinstance(events, list):
        return []
    entry = events[int(index[1])]
    kind = KINDS.get(entry.get("kind", "")) if isinstance(entry, dict) else None
    return ["kind", *kind.__struct_fields__] if kind is not None else []
