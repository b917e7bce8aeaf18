"""``llmops-gateway``: the OpenAI-compatible gateway. ``llmops-gateway --config FILE``.

Stateless but for usage metering, so it scales by running more of them behind one address.
One TaskGroup: the HTTP server, the router's refresh from the controller, the usage flush.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

import aiohttp
import structlog
from aiohttp import web

from llm_ops_helper import logs
from llm_ops_helper.controller.gateway import config as gateway_config
from llm_ops_helper.controller.gateway.app import Gateway, Guards, GuardsFor, build_app
from llm_ops_helper.controller.gateway.config import EX_CONFIG, ConfigError, KeyConfig
from llm_ops_helper.controller.gateway.metering import GatewayMetrics, Meter
from llm_ops_helper.controller.gateway.routing import Router
from llm_ops_helper.controller.gateway.upstream import Upstream
from llm_ops_helper.lifecycle import run_until_signalled

# In-flight requests (streams among them) get this long after SIGTERM.
SHUTDOWN_TIMEOUT_S = 15.0
log = structlog.get_logger("llmops.gateway")


def guards_builder(config: gateway_config.GatewayConfig) -> GuardsFor:
    """The guards of a key's requests to a deployment, each built once: one Guards per profile,
    shared by the keys and models that name it, one per inline table, and one GuardChain per
    (key, deployment) where both have guards (the key's checks first)."""
    from llm_ops_helper.controller.gateway.guards import GuardChain, GuardConfig, build_guards
    from llm_ops_helper.controller.gateway.guards import Guards as ProfileGuards

    profiles: dict[str, ProfileGuards] = {}

    def built(spec: gateway_config.GuardSpec, guard_config: GuardConfig | None
              ) -> ProfileGuards | None:
        if guard_config is None:
            return None
        if isinstance(spec, str):
            if spec not in profiles:
                profiles[spec] = build_guards(guard_config)
            return profiles[spec]
        return build_guards(guard_config)

    by_key = {key.name: built(key.guards, config.guard_config(key)) for key in config.keys}
    by_model = {model.name: built(model.guards, config.model_guard_config(model))
                for model in config.models}
    chains: dict[tuple[str, str], Guards] = {}

    def guards_for(key: KeyConfig, deployment: str | None) -> Guards | None:
        own = by_key[key.name]
        if deployment is None or (model := by_model.get(deployment)) is None or model is own:
            return own  # the same profile on key and model runs once
        if own is None:
            return model
        if (key.name, deployment) not in chains:
            chains[key.name, deployment] = GuardChain([own, model])
        return chains[key.name, deployment]
    return guards_for


async def run(config: gateway_config.GatewayConfig, stop: asyncio.Event) -> None:
    limits = config.limits
    # The session polls the controller; requests to replicas go through Upstream's connections.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        router = Router(session, config.controller.url, config.controller_token,
                        refresh_s=config.controller.refresh_s, suspect_s=limits.suspect_s)
        meter = Meter(config.state_dir() / "usage.sqlite", GatewayMetrics())
        upstream = Upstream(limits.connect_timeout_s, limits.read_timeout_s)
        gateway = Gateway(config, router, meter, upstream, guards_builder(config))
        runner = web.AppRunner(build_app(gateway), access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.http.host, config.http.port).start()
            log.info("gateway_listening", host=config.http.host, port=config.http.port,
                     controller=config.controller.url, keys=len(config.keys))
            async with asyncio.TaskGroup() as group:
                group.create_task(router.run(stop))
                group.create_task(meter.run(stop, config.state.flush_s))
                await stop.wait()
        finally:
            await runner.cleanup()
            upstream.close()
            await meter.flush()
            log.info("gateway_stopped")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where installed (``pip install llm-ops-helper[gateway]``): a proxy
    spends most of its time in the loop's socket handling, which uvloop does in C."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops-gateway", description=__doc__)
    parser.add_argument("--config", "-c", default=os.environ.get(
        "LLMOPS_GATEWAY_CONFIG", "/etc/llmops/gateway.toml"))
    args = parser.parse_args(argv)
    try:
        config = gateway_config.load(args.config)
        logs.configure(config.log_level)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(run_until_signalled(lambda stop: run(config, stop), "gateway",
                                                  SHUTDOWN_TIMEOUT_S))
    except ConfigError as exc:
        print(f"llmops-gateway: {exc}", file=sys.stderr)
        return EX_CONFIG
    except OSError as exc:
        print(f"llmops-gateway: {exc}", file=sys.stderr)
        return 71  # EX_OSERR


if __name__ == "__main__":
    sys.exit(main())
