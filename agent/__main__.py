"""``llmops-agent``: the GPU-host daemon. ``llmops-agent --config /etc/llmops/agent.toml``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys

from llm_ops_helper import logs
from llm_ops_helper.agent import config as agent_config
from llm_ops_helper.agent.config import EX_CONFIG, ConfigError
from llm_ops_helper.lifecycle import run_until_signalled

# A stop publishes "offline" and disconnects; past this, the daemon gives up waiting.
SHUTDOWN_TIMEOUT_S = 4.0


async def serve(config: agent_config.AgentConfig) -> int:
    from llm_ops_helper.agent.wiring import build_agent

    agent = build_agent(config)
    # Everything allocated so far lives as long as the process: keep the cyclic collector from
    # walking it again on every full collection (a steady per-tick saving at 1 Hz).
    gc.freeze()
    limit = SHUTDOWN_TIMEOUT_S
    if config.supervisor.stop_replicas_on_exit:  # each replica gets its SIGTERM grace period
        limit += config.supervisor.stop_grace_s
    return await run_until_signalled(agent.run, "agent", limit)


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
