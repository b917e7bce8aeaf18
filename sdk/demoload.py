"""The demo's traffic: chat completions through the gateway at a rate that rises and falls.

:func:`rate_at` and :func:`phase_at` are the profile, a pure function of the time into a cycle
of ``span_s`` seconds: a trickle, a rise to the peak, a plateau, a fall, and a trickle again
long enough for the autoscaler's scale-down window to pass. :class:`Load` sends open-loop
requests at that rate (each one its own task, a bounded number in flight) and counts answers,
failures and the requests it skipped because too many were in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aiohttp

BASE_RPS = 0.4
PEAK_RPS = 5.0
MAX_IN_FLIGHT = 16
# Fractions of the cycle where each phase ends.
PHASES = (("trickle", 0.05), ("rising", 0.3), ("peak", 0.42), ("falling", 0.55),
          ("trickle", 1.0))


def phase_at(t: float, span_s: float) -> str:
    x = (t % span_s) / span_s
    return next(name for name, end in PHASES if x < end)


def rate_at(t: float, span_s: float) -> float:
    """Requests per second ``t`` seconds into the load (cycles of ``span_s``)."""
    x = (t % span_s) / span_s
    _, rise_start = PHASES[0]
    _, rise_end = PHASES[1]
    _, fall_start = PHASES[2]
    _, fall_end = PHASES[3]
    if x < rise_start or x >= fall_end:
        return BASE_RPS
    if x < rise_end:
        return BASE_RPS + (PEAK_RPS - BASE_RPS) * (x - rise_start) / (rise_end - rise_start)
    if x < fall_start:
        return PEAK_RPS
    return PEAK_RPS - (PEAK_RPS - BASE_RPS) * (x - fall_start) / (fall_end - fall_start)


@dataclass
class Load:
    url: str
    key: str
    model: str
    span_s: float
    ok: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str = ""
    _in_flight: set[asyncio.Task[None]] = field(default_factory=set)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": self.model, "max_tokens": 8, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Hello, request {i}"}]}
        try:
            async with session.post(f"{self.url}/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {self.key}"}) as resp:
                await resp.read()
                if resp.status == 200:
                    self.ok += 1
                    return
                self.last_error = f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
        self.failed += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set; requests in flight then are cancelled."""
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            start = due = loop.time()
            i = 0
            try:
                while not stop.is_set():
                    if len(self._in_flight) >= MAX_IN_FLIGHT:
                        self.dropped += 1
                    else:
                        task = asyncio.create_task(self._one(session, i))
                        self._in_flight.add(task)
                        task.add_done_callback(self._in_flight.discard)
                    i += 1
                    due += 1.0 / rate_at(due - start, self.span_s)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)
