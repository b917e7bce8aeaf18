"""The agent's MQTT v5 connection: status, telemetry out, commands in, reconnect forever.

On every connect: publish the retained ``online`` status (the Last Will says ``offline``),
subscribe to the commands topic on a persistent session (commands sent while the agent was
away are delivered when it returns), then send the outbox oldest first. Connection loss ends the
session; the outer loop reconnects with jittered exponential backoff. On stop: publish a
retained ``offline`` status and disconnect cleanly, so the Will does not fire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiomqtt
import msgspec
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from llm_ops_helper.agent.config import BrokerConfig
from llm_ops_helper.agent.outbox import Outbox
from llm_ops_helper.brokertls import connect_hint, handshake_hint, settings_context
from llm_ops_helper.lifecycle import reconnect_forever
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.messages import Status
from llm_ops_helper.proto.topics import TopicKind, agent_topic

log = structlog.get_logger("llmops.agent.link")

# Messages in flight at once while draining a backlog (paho's own inflight window is 20).
SEND_WINDOW = 16
PUBLISH_TIMEOUT_S = 10.0
# On stop, how long to keep sending what is queued before publishing "offline".
FLUSH_ON_STOP_S = 1.0


class Link:
    def __init__(
        self,
        config: BrokerConfig,
        host: str,
        outbox: Outbox,
        status: Callable[[], Status],
        on_command: Callable[[bytes], Awaitable[None]],
        password: str | None = None,
    ) -> None:
        self.config = config
        self.host = host
        self.outbox = outbox
        self.status = status
        self.on_command = on_command
        self.password = password
        self.status_topic = agent_topic(host, TopicKind.STATUS)
        self.commands_topic = agent_topic(host, TopicKind.COMMANDS)
        self.connects = 0

    def _client(self) -> aiomqtt.Client:
        will = msgspec.structs.replace(self.status(), state="offline", reason="lost",
                                       ts=time.time())
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        return aiomqtt.Client(
            self.config.host,
            self.config.port,
            identifier=f"llmops-agent-{self.host}",
            protocol=aiomqtt.ProtocolVersion.V5,
            will=aiomqtt.Will(self.status_topic, encode(will), qos=1, retain=True),
            clean_start=False,
            keepalive=self.config.keepalive_s,
            properties=properties,
            username=self.config.username or None,
            password=self.password,
            timeout=PUBLISH_TIMEOUT_S,
            tls_context=settings_context(self.config),
        )

    async def run(self, stop: asyncio.Event) -> None:
        def on_error(error: str, delay: float) -> None:
            tls_hint = handshake_hint(error, self.config.ca_file) if self.config.tls else None
            log.warning("broker_tls_failed" if tls_hint else "broker_unreachable",
                        broker=f"{self.config.host}:{self.config.port}", error=error,
                        hint=tls_hint or connect_hint(error, self.config),
                        retry_in_s=round(delay, 2), backlog=len(self.outbox))

        await reconnect_forever(lambda: self._session(stop), stop,
                                low=self.config.reconnect_min_s,
                                high=self.config.reconnect_max_s,
                                connects=lambda: self.connects, on_error=on_error)

    async def _session(self, stop: asyncio.Event) -> None:
        async with self._client() as client:
            self.connects += 1
            await client.publish(self.status_topic, encode(self.status()), qos=1, retain=True)
            await client.subscribe(self.commands_topic, qos=1)
            log.info("broker_connected", broker=f"{self.config.host}:{self.config.port}",
                     connects=self.connects, backlog=len(self.outbox))
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._send(client)), tg.create_task(self._receive(client))]
                await stop.wait()
                for task in tasks:
                    task.cancel()
            # What the last ticks queued (a final event, say) goes out before "offline".
            try:
                async with asyncio.timeout(FLUSH_ON_STOP_S):
                    while len(self.outbox):
                        await self._send_batch(client)
            except TimeoutError:
                pass
            offline = msgspec.structs.replace(self.status(), state="offline", reason="shutdown",
                                              ts=time.time())
            await client.publish(self.status_topic, encode(offline), qos=1, retain=True,
                                 timeout=2.0)
        log.info("broker_disconnected", reason="shutdown", unsent=len(self.outbox))

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            await self.outbox.wait()
            await self._send_batch(client)

    async def _send_batch(self, client: aiomqtt.Client) -> None:
        batch = self.outbox.head(SEND_WINDOW)
        try:
            await asyncio.gather(*(client.publish(m.topic, m.payload, qos=m.qos) for m in batch))
        except BaseException:
            self.outbox.failed()
            raise
        self.outbox.done(batch)

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if not message.topic.matches(self.commands_topic):
                log.warning("message_unexpected_topic", topic=str(message.topic))
                continue
            await self.on_command(message.payload)
