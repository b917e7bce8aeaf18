"""Real HTTP pieces around a gateway under test: a controller stand-in, scripted OpenAI
backends, simulator replica processes, and the gateway itself on a local port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from llm_ops_helper.agent.runtimes.simserver.card import write_model_card
from llm_ops_helper.controller.gateway import __main__ as gateway_main
from llm_ops_helper.controller.gateway.app import Gateway, build_app
from llm_ops_helper.controller.gateway.config import GatewayConfig, parse_config
from llm_ops_helper.controller.gateway.metering import GatewayMetrics, Meter
from llm_ops_helper.controller.gateway.routing import Router
from llm_ops_helper.controller.gateway.upstream import Upstream

TOKEN = "controller-admin-token"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# Key "a" (Bearer sk-a), allowed every model: the key most gateway tests call with.
KEY_A = f"""
[[keys]]
name = "a"
sha256 = "{sha('sk-a')}"
models = ["*"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{bound}"


@dataclass
class FakeController:
    """The two routes of the controller API the gateway reads, over real HTTP, with a token."""

    endpoints: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    seen_tokens: list[str] = field(default_factory=list)

    def set(self, deployment: str, *urls: str, version: str | None = None) -> None:
        self.endpoints[deployment] = [
            {"replica": f"{deployment}-{i}-{url.rsplit(':', 1)[-1]}", "url": url,
             "host": "h", "version": version or f"{deployment}@1"} for i, url in enumerate(urls)]

    def app(self) -> web.Application:
        async def check(request: web.Request) -> None:
            self.seen_tokens.append(request.headers.get("Authorization", ""))
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                raise web.HTTPUnauthorized()

        async def listing(request: web.Request) -> web.Response:
            await check(request)
            return web.json_response({"deployments": [{"name": n} for n in self.endpoints]})

        async def endpoints(request: web.Request) -> web.Response:
            await check(request)
            name = request.match_info["name"]
            if name not in self.endpoints:
                raise web.HTTPNotFound()
            return web.json_response({"endpoints": self.endpoints[name]})

        app = web.Application()
        app.router.add_get("/api/v1/deployments", listing)
        app.router.add_get("/api/v1/deployments/{name}/endpoints", endpoints)
        return app


StreamScript = Callable[[web.StreamResponse, dict[str, Any]], Awaitable[None]]


def chunk(text: str | None, finish: str | None = None, model: str = "m") -> bytes:
    delta = {} if text is None else {"content": text}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def in_pieces(*pieces: str) -> StreamScript:
    """A stream script sending each piece as one chunk, then the stop chunk and [DONE]."""
    async def script(out: web.StreamResponse, body: dict[str, Any]) -> None:
        for piece in pieces:
            await out.write(chunk(piece))
        await out.write(chunk(None, "stop"))
        await out.write(b"data: [DONE]\n\n")
    return script


@dataclass
class Backend:
    """A scripted OpenAI backend: whole answers name the backend; streams follow ``script``."""

    name: str
    script: StreamScript | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    text: str = "hello"

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.requests.append(body)
            if body.get("stream"):
                out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await out.prepare(request)
                if self.script is not None:
                    await self.script(out, body)
                else:
                    for word in self.text.split(" "):
                        await out.write(chunk(word + " "))
                    await out.write(chunk(None, "stop"))
                    await out.write(b'data: {"id": "chatcmpl-1", "choices": [], "usage": '
                                    b'{"prompt_tokens": 3, "completion_tokens": 2}}\n\n')
                    await out.write(b"data: [DONE]\n\n")
                return out
            return web.json_response({
                "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                "backend": self.name,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": self.text}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


def config_text(controller_url: str, state_dir: Path, keys: str, **limits: Any) -> str:
    token_file = state_dir / "controller.token"
    state_dir.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN + "\n")
    lines = ["[http]", 'host = "127.0.0.1"', "port = 0", "[controller]",
             f'url = "{controller_url}"', f'token_file = "{token_file}"', "refresh_s = 0.1",
             "[state]", f'dir = "{state_dir}"', "flush_s = 0.1", "[limits]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"hold_s": 0.3, **limits}.items()]
    return "\n".join(lines) + "\n" + keys


@dataclass
class RunningGateway:
    url: str
    gateway: Gateway
    session: aiohttp.ClientSession  # the test's client

    def headers(self, key: str = "sk-a") -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async def chat(self, model: str = "m", key: str = "sk-a", **body: Any
                   ) -> aiohttp.ClientResponse:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        return await self.session.post(self.url + "/v1/chat/completions", json=payload,
                                       headers=self.headers(key))


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[RunningGateway]:
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as upstream, aiohttp.ClientSession() as client:
        router = Router(upstream, config.controller.url, config.controller_token,
                        refresh_s=config.controller.refresh_s,
                        suspect_s=config.limits.suspect_s)
        meter = Meter(config.state_dir() / "usage.sqlite", GatewayMetrics())
        replicas = Upstream(config.limits.connect_timeout_s, config.limits.read_timeout_s)
        gateway = Gateway(config, router, meter, replicas, gateway_main.guards_builder(config))
        await router.refresh()
        runner, url = await serve(build_app(gateway))
        task = asyncio.create_task(router.run(stop))
        try:
            yield RunningGateway(url, gateway, client)
        finally:
            stop.set()
            await task
            await runner.cleanup()
            replicas.close()


def gateway_config(controller_url: str, state_dir: Path, keys: str, **limits: Any
                   ) -> GatewayConfig:
    return parse_config(config_text(controller_url, state_dir, keys, **limits),
                        str(state_dir / "gateway.toml"))


class SimReplica:
    """The OpenAI simulator as a real process on a free port."""

    def __init__(self, workdir: Path, served: str, **card: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        card_path = write_model_card(workdir / f"card-{self.port}.toml",
                                     **({"startup_s": 0.0, "ttft_base_ms": 1.0, "itl_ms": 1.0}
                                        | card))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llm_ops_helper.agent.runtimes.simserver",
             "--model-card", str(card_path), "--port", str(self.port),
             "--served-model-name", served], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    async def ready(self, timeout_s: float = 20.0) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
