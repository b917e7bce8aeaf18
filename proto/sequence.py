"""Telemetry sequence tracking for consumers: drop duplicates, count gaps.

Telemetry travels at QoS 1, which is at-least-once: a snapshot the broker received but whose
acknowledgement was lost when the connection dropped is sent again after the reconnect. That
is the right trade (QoS 2 per hop does not survive a broker crash or a new client session
either), and ``(run_id, seq)`` makes the consumer side exact: every ``seq`` counts once, late
ones fill the gaps they left, and what never came is counted as missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Verdict(Enum):
    FRESH = "fresh"  # first time this seq is seen: use it
    LATE = "late"  # first time, but below the highest seen: it fills a gap
    DUPLICATE = "duplicate"  # seen before: drop it


@dataclass
class _Run:
    run_id: str
    highest: int = 0
    missing: set[int] = field(default_factory=set)


@dataclass
class SeqTracker:
    """Per-host sequence state. ``window`` bounds how far back a late seq can still count."""

    window: int = 4096
    duplicates: int = 0
    late: int = 0
    restarts: int = 0
    _runs: dict[str, _Run] = field(default_factory=dict)

    def observe(self, host: str, run_id: str, seq: int) -> Verdict:
        run = self._runs.get(host)
        if run is None or run.run_id != run_id:
            if run is not None:
                self.restarts += 1
            run = self._runs[host] = _Run(run_id)
        if seq > run.highest:
            run.missing.update(range(max(run.highest + 1, seq - self.window), seq))
            run.highest = seq
            if len(run.missing) > self.window:
                floor = seq - self.window
                run.missing = {s for s in run.missing if s >= floor}
            return Verdict.FRESH
        if seq in run.missing:
            run.missing.discard(seq)
            self.late += 1
            return Verdict.LATE
        self.duplicates += 1
        return Verdict.DUPLICATE

    def forget(self, host: str) -> None:
        self._runs.pop(host, None)

    def missing(self, host: str) -> int:
        """Seqs of the host's current run not (yet) received, within the window."""
        run = self._runs.get(host)
        return len(run.missing) if run else 0
