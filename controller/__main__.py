"""``llmops-controller``: the head-node daemon. ``llmops-controller --config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys

from llm_ops_helper import logs
from llm_ops_helper.controller import config as controller_config
from llm_ops_helper.controller.config import EX_CONFIG, ConfigError
from llm_ops_helper.lifecycle import run_until_signalled

# Scoring the last batch, a checkpoint and closing the HTTP server; past this, give up.
SHUTDOWN_TIMEOUT_S = 10.0


async def serve(config: controller_config.ControllerConfig) -> int:
    from llm_ops_helper.controller.daemon import Controller
    from llm_ops_helper.controller.state import build_state
    from llm_ops_helper.systemd_notify import Notifier

    controller = Controller(build_state(config), Notifier())
    # Everything allocated so far lives as long as the process: keep the cyclic collector from
    # walking it again on every full collection.
    gc.freeze()
    return await run_until_signalled(controller.run, "controller", SHUTDOWN_TIMEOUT_S)


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
