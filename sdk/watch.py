"""``llmops watch``: follow agents' messages on a broker, one line each (or raw JSON)."""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

import aiomqtt
import msgspec

from llm_ops_helper.proto.codec import DecodeError, decode_for_topic
from llm_ops_helper.proto.messages import Event, Status, Telemetry
from llm_ops_helper.proto.topics import PREFIX, AgentTopic, TopicError


def summarize(message: msgspec.Struct) -> str:
    if isinstance(message, Telemetry):
        gpus = message.gpus
        util = " ".join(f"{g.utilization_gpu_pct:3.0f}" if g.healthy and
                        g.utilization_gpu_pct is not None else "  ✗" for g in gpus)
        temps = [g.temperature_c for g in gpus if g.temperature_c is not None]
        power = sum(g.power_w or 0 for g in gpus)
        h = message.host_metrics
        host = (f"cpu {h.cpu_pct:4.1f}% mem {h.memory_used_bytes / 2**30:5.1f} GiB" if h
                else "no host")
        failed = [c.name for c in message.collectors if not c.ok]
        unhealthy = [g.index for g in gpus if not g.healthy]
        parts = [f"{message.host} seq={message.seq}", f"gpu% [{util}]",
                 f"max {max(temps):.0f}°C" if temps else "", f"{power:.0f} W", host,
                 f"replicas {sum(r.up for r in message.replicas)}/{len(message.replicas)}"]
        if unhealthy:
            parts.append(f"UNHEALTHY gpu {unhealthy}")
        if failed:
            parts.append(f"failed collectors {failed}")
        return "  ".join(p for p in parts if p)
    if isinstance(message, Event):
        where = f" gpu {message.gpu}" if message.gpu is not None else ""
        return (f"{message.host} EVENT {message.severity.upper()} {message.kind}{where}: "
                f"{message.message}")
    if isinstance(message, Status):
        return (f"{message.host} STATUS {message.state}"
                + (f" ({message.reason})" if message.reason else "")
                + (f" agent {message.agent_version}, {len(message.gpus)} GPUs"
                   if message.state == "online" else ""))
    return f"{type(message).__name__} {msgspec.json.encode(message).decode()}"


async def watch(host: str, port: int, *, raw: bool = False, out: TextIO = sys.stdout,
                stop: asyncio.Event | None = None) -> None:
    done = stop or asyncio.Event()
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)
        stopper = asyncio.ensure_future(done.wait())
        messages = aiter(client.messages)
        while True:
            getter = asyncio.ensure_future(anext(messages))
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return
            message = getter.result()
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if raw:
                print(f"{message.topic} {payload.decode(errors='replace')}", file=out, flush=True)
                continue
            try:
                kind = AgentTopic.parse(str(message.topic)).kind
                print(summarize(decode_for_topic(payload, kind)), file=out, flush=True)
            except (TopicError, DecodeError) as exc:
                print(f"{message.topic} undecodable: {exc}", file=out, flush=True)
