"""``python -m llm_ops_helper.agent.runtimes.simserver``: run the simulator (see the package)."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path

import structlog
from aiohttp import web

from llm_ops_helper import logs
from llm_ops_helper.agent.runtimes.simserver.app import SimState, build_app
from llm_ops_helper.agent.runtimes.simserver.card import ModelCard, load_card
from llm_ops_helper.agent.runtimes.simserver.engine import Engine, Metrics
from llm_ops_helper.lifecycle import run_until_signalled
from llm_ops_helper.tomlfile import ConfigError

EX_USAGE = 2
# In-flight requests get this long to finish after SIGTERM.
SHUTDOWN_TIMEOUT_S = 5.0
log = structlog.get_logger("llmops.simserver")


class SimExit(Exception):
    """The simulator stops with an exit code and one line saying why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _crash(card_path: Path, after_s: float) -> None:
    print(f"simserver: crashing as {card_path} asks (faults.crash_after_s = {after_s})",
          file=sys.stderr, flush=True)
    os._exit(1)  # a crash: no shutdown, no goodbye to clients


def _hang(state: SimState) -> None:
    log.warning("sim_hanging", reason="faults.hang_after_s")
    state.hung = True


async def serve(card_path: Path, card: ModelCard, *, host: str, port: int, served: str,
                seed: int | None, stop: asyncio.Event) -> None:
    metrics = Metrics(served)
    state = SimState(card=card, served_model_name=served, engine=Engine(card.sim, metrics),
                     metrics=metrics, hung=card.faults.hang, rng=random.Random(seed))
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise SimExit(1, f"simserver: cannot listen on {host}:{port}: "
                             f"{exc.strerror or exc}") from None
        log.info("sim_loading", card=str(card_path), host=host, port=port,
                 startup_s=card.sim.startup_s)
        try:
            async with asyncio.timeout(card.sim.startup_s):
                await stop.wait()
            return  # stopped while loading
        except TimeoutError:
            pass
        if card.faults.exit_at_start:
            raise SimExit(1, f"simserver: {card_path}: failed to load the model "
                             f"(faults.exit_at_start = true)")
        state.loading = False
        log.info("sim_ready", served_model_name=served)
        loop = asyncio.get_running_loop()
        if card.faults.crash_after_s is not None:
            loop.call_later(card.faults.crash_after_s, _crash, card_path,
                            card.faults.crash_after_s)
        if card.faults.hang_after_s is not None:
            loop.call_later(card.faults.hang_after_s, _hang, state)
        await stop.wait()
    finally:
        state.stopping.set()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_ops_helper.agent.runtimes.simserver",
                                     description="vLLM-compatible inference simulator")
    parser.add_argument("--model-card", required=True, type=Path, help="the TOML model card")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default="",
                        help="the model name clients use (default: the card's file stem)")
    parser.add_argument("--seed", type=int, default=None, help="seed for faults.error_rate")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        card = load_card(args.model_card)
    except ConfigError as exc:
        print(f"simserver: {exc}", file=sys.stderr, flush=True)
        return EX_USAGE
    logs.configure(args.log_level, stream=sys.stderr)
    served = args.served_model_name or args.model_card.stem

    async def run(stop: asyncio.Event) -> None:
        await serve(args.model_card, card, host=args.host, port=args.port, served=served,
                    seed=args.seed, stop=stop)

    try:
        return asyncio.run(run_until_signalled(run, "sim", SHUTDOWN_TIMEOUT_S + 1))
    except SimExit as exc:
        print(exc, file=sys.stderr, flush=True)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
