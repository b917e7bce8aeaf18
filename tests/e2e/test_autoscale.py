"""Predictive autoscaling against real processes: Mosquitto, the controller, three agents and
``sim`` replicas that saturate (two requests at a time, the rest queue).

Two deployments (min 1, max 6) take the same rising-then-falling request rate side by side:
one with autoscaling ``on``, which scales up while the time to first token is still within its
SLO and back down once the load has dropped and the stabilisation window has passed; one in
``advisory``, whose replica count never moves though it records the same kind of decisions.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.client import LLMOpsHelper
from llm_ops_helper.localfleet import LocalFleet, openai_chat

pytestmark = pytest.mark.slow

TTFT_SLO_S = 0.5
WINDOW_S = 6.0
# Requests per second over the run: rising, a plateau, then falling to a trickle.
RAMP = [1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 16.0, 16.0, 16.0, 12.0, 6.0, 2.0, 1.0]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    local = LocalFleet(tmp_path / "fleet", agents_count=3, gpus_per_agent=2,
                       controller_overrides={"autoscale": {"interval_s": 1.0,
                                                           "default_cold_start_s": 2.0}})
    async with local:
        yield local


class Load:
    """Open-loop requests at the rate of the schedule (one rate per second, then the last one
    until stopped), each to a ready replica from the controller's endpoint list."""

    def __init__(self, helper: LLMOpsHelper, deployment: str, schedule: list[float]) -> None:
        self.helper, self.deployment, self.schedule = helper, deployment, schedule
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=64)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, i: int) -> None:
        endpoints = self.helper.endpoints(self.deployment)
        if not endpoints:
            self.failures.append("no ready endpoint")
            return
        try:
            openai_chat(endpoints[i % len(endpoints)].url, self.deployment, f"request {i}",
                        max_tokens=4)
            self.ok += 1
        except (OSError, urllib.error.HTTPError, json.JSONDecodeError) as exc:
            self.failures.append(str(exc))

    def _run(self) -> None:
        start, i = time.monotonic(), 0
        due = start
        while not self._stop.is_set():
            second = int(due - start)
            rate = self.schedule[min(second, len(self.schedule) - 1)]
            self._pool.submit(self._one, i)
            i += 1
            due += 1.0 / rate
            self._stop.wait(max(0.0, due - time.monotonic()))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)


def decisions(fleet: LocalFleet, name: str) -> list[dict[str, Any]]:
    """Oldest first."""
    body = fleet.get(f"/api/v1/deployments/{name}/decisions?limit=10000")
    return list(reversed(body["decisions"]))


async def test_scales_up_ahead_of_the_slo_and_down_after_the_window_advisory_changes_nothing(
        fleet: LocalFleet, tmp_path: Path) -> None:
    helper = LLMOpsHelper(fleet.url, token=fleet.token, poll_interval=0.2)
    card = write_model_card(tmp_path / "chat.toml", startup_s=0.5, ttft_base_ms=20.0,
                            itl_ms=50.0, max_concurrency=2, max_tokens=4)
    settings = {"capacity_tokens_per_s": 40.0, "ttft_slo_s": TTFT_SLO_S, "itl_slo_s": 0.2,
                "scale_down_window_s": WINDOW_S, "interval_s": 1.0}
    for name, mode in (("chat", "on"), ("shadow", "advisory")):
        await asyncio.to_thread(helper.deploy_model, str(card), name=name, replicas=1,
                                min_replicas=1, max_replicas=6, timeout=60,
                                autoscale=settings | {"mode": mode})

    with Load(helper, "chat", RAMP) as on, Load(helper, "shadow", RAMP) as advisory:
        await asyncio.sleep(len(RAMP))
        # The trickle goes on while the stabilisation window passes.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (await asyncio.to_thread(helper.status, "chat")).desired == 1:
                break
            await asyncio.sleep(0.5)
    assert on.ok > 0 and advisory.ok > 0

    made = decisions(fleet, "chat")
    up = next(d for d in made if d["applied"] and d["desired"] > d["current"])
    before = made[:made.index(up) + 1]
    # Scaled up while the time to first token (and so the queue) was still within its SLO.
    assert all(d["inputs"] is None or (d["inputs"]["ttft_mean_s"] or 0.0) <= TTFT_SLO_S
               for d in before), [(d["rule"], d["inputs"]) for d in before]
    assert up["rule"] in ("forecast", "reactive", "queue", "budget", "max"), up
    peak = max(d["desired"] for d in made)
    assert 2 <= peak <= 6
    # Back down: not before the stabilisation window after the last recommendation of the peak.
    last_peak = max(d["ts"] for d in made if d["needed"] is not None and d["needed"] >= peak)
    at_peak = next(d for d in made if d["desired"] == peak)
    down = next(d for d in made if d["ts"] > at_peak["ts"] and d["desired"] < peak)
    assert any(d["rule"] == "stabilisation" for d in made if d["ts"] < down["ts"])
    assert down["ts"] - last_peak >= WINDOW_S - 1.0, (down, last_peak)
    assert made[-1]["desired"] == 1 and helper.status("chat").desired == 1
    assert made[0]["rule"] == "no_metrics" and "holding 1 replica" in made[0]["reason"]

    shadow = decisions(fleet, "shadow")
    assert {d["current"] for d in shadow} == {1}
    assert not any(d["applied"] for d in shadow)
    wanted = [d for d in shadow if d["desired"] > 1]
    assert wanted and all(d["reason"].endswith("advisory mode, not applied") for d in wanted)
    assert {d["rule"] for d in wanted} & {"forecast", "reactive", "queue"}
    assert helper.status("shadow").desired == 1 and len(helper.status("shadow").replicas) == 1
