"""``llmops-controller``: the head-node daemon. ``llmops-controller --config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys

import structlog

from llm_ops_helper import logs
from llm_ops_helper.controller import config as controller_config
from llm_ops_helper.controller.config import EX_CONFIG, ConfigError

# Scoring the last batch, a checkpoint and closing the HTTP server; past this, give up.
SHUTDOWN_TIMEOUT_S = 10.0


async def serve(config: controller_config.ControllerConfig) -> int:
    from llm_ops_helper.controller.daemon import Controller
    from llm_ops_helper.controller.state import build_state
    from llm_ops_helper.systemd_notify import Notifier

    controller = Controller(build_state(config), Notifier())
    gc.freeze()
    log = structlog.get_logger("llmops.controller")
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # a second signal forces the exit
            os._exit(128 + signum)
        log.info("controller_stopping", signal=signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    running = asyncio.ensure_future(controller.run(stop))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if running.done():
        running.result()  # a start-up failure (port in use) ends here, with its error
        return 0
    try:
        await asyncio.wait_for(running, SHUTDOWN_TIMEOUT_S)
    except TimeoutError:
        log.error("shutdown_timeout", limit_s=SHUTDOWN_TIMEOUT_S)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops-controller", description=__doc__)
    parser.add_argument("--config", "-c", default=os.environ.get(
        "LLMOPS_CONTROLLER_CONFIG", "/etc/llmops/controller.toml"))
    args = parser.parse_args(argv)
    try:
        config = controller_config.load(args.config)
        logs.configure(config.log_level)
        return asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"llmops-controller: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:  # the HTTP port in use, the state directory not writable
        print(f"llmops-controller: {exc}", file=sys.stderr)
        return 71  # EX_OSERR


if __name__ == "__main__":
    sys.exit(main())
