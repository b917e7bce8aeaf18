"""Fixtures for the fault suite: a real fleet (Mosquitto and the controller as processes) and
readings of what the controller says about itself (/metrics) and what it costs (RSS)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_ops_helper.localfleet import LocalFleet

# Hostile input comes from a few host names at a rate no real agent has: the rate limit is
# lifted so that every payload reaches the decoder (a flood is the load test's business).
UNLIMITED = {"fleet": {"max_messages_per_s": 1e9, "burst": 1_000_000_000}}
_SAMPLE = re.compile(r'^(\w+)(?:\{(\w+)="([^"]*)"\})? ([0-9.e+-]+)$')


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    """Mosquitto and the controller, real processes, no agents."""
    local = LocalFleet(tmp_path / "fleet", agents_count=0, controller_overrides=UNLIMITED)
    async with local:
        yield local


def scrape(fleet: LocalFleet) -> dict[str, dict[str, float]]:
    """The controller's /metrics: metric name -> label value ('' when none) -> value."""
    import urllib.request

    request = urllib.request.Request(fleet.url + "/metrics",
                                     headers={"Authorization": f"Bearer {fleet.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found:
            name, _, label, value = found.groups()
            out.setdefault(name, {})[label or ""] = float(value)
    return out


async def metrics(fleet: LocalFleet) -> dict[str, dict[str, float]]:
    return await asyncio.to_thread(scrape, fleet)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
