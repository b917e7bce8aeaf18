"""``llmops-agent``: the GPU-host daemon. ``llmops-agent --config /etc/llmops/agent.toml``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys

import structlog

from llm_ops_helper import logs
from llm_ops_helper.agent import config as agent_config
from llm_ops_helper.agent.config import EX_CONFIG, ConfigError

# A stop publishes "offline" and disconnects; past this, the daemon gives up waiting.
SHUTDOWN_TIMEOUT_S = 4.0


async def serve(config: agent_config.AgentConfig) -> int:
    from llm_ops_helper.agent.wiring import build_agent

    agent = build_agent(config)
    # Everything allocated so far lives as long as the process: keep the cyclic collector from
    # walking it again on every full collection (a steady per-tick saving at 1 Hz).
    gc.freeze()
    log = structlog.get_logger("llmops.agent")
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal forces the exit
            os._exit(128 + signum)
        log.info("agent_stopping", signal=signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    running = asyncio.ensure_future(agent.run(stop))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    try:
        await asyncio.wait_for(running, SHUTDOWN_TIMEOUT_S)
    except TimeoutError:
        log.error("shutdown_timeout", limit_s=SHUTDOWN_TIMEOUT_S)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops-agent", description=__doc__)
    parser.add_argument("--config", "-c", default=os.environ.get("LLMOPS_AGENT_CONFIG",
                                                                 "/etc/llmops/agent.toml"))
    args = parser.parse_args(argv)
    try:
        config = agent_config.load(args.config)
        logs.configure(config.log_level, host=config.hostname)
        return asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"llmops-agent: {exc}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())
