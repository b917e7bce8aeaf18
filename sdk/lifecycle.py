"""What both daemons do around their main loop: reconnect to the broker, stop on a signal.

As uvicorn runs a server: signal handlers only set a stop event, a second signal forces the
exit, and shutdown has a time limit. The broker link reconnects forever with jittered
exponential backoff, and a session that got connected starts the backoff afresh.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import aiomqtt
import structlog

from llm_ops_helper.backoff import backoff_delay


async def reconnect_forever(session: Callable[[], Awaitable[None]], stop: asyncio.Event, *,
                            low: float, high: float, connects: Callable[[], int],
                            on_error: Callable[[str, float], None]) -> None:
    """Run ``session`` until it returns (a clean stop); after a broker error, wait and retry.

    ``connects`` counts the sessions that got connected; ``on_error(error, retry_in_s)`` logs.
    """
    failures = 0
    while not stop.is_set():
        before = connects()
        try:
            await session()
            return
        except* aiomqtt.MqttError as group:
            error = "; ".join(str(e) for e in group.exceptions)
        if connects() > before:
            failures = 0
        delay = backoff_delay(failures, low, high)
        failures += 1
        on_error(error, delay)
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass


async def run_until_signalled(run: Callable[[asyncio.Event], Awaitable[None]], name: str,
                              shutdown_timeout_s: float) -> int:
    """Run ``run(stop)``; SIGTERM or SIGINT sets ``stop``, a second one exits at once."""
    log = structlog.get_logger(f"llmops.{name}")
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal forces the exit
            os._exit(128 + signum)
        log.info(f"{name}_stopping", signal=signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    running = asyncio.ensure_future(run(stop))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if running.done():
        running.result()  # a start-up failure (a port in use) ends here, with its error
        return 0
    try:
        await asyncio.wait_for(running, shutdown_timeout_s)
    except TimeoutError:
        log.error("shutdown_timeout", limit_s=shutdown_timeout_s)
    return 0
