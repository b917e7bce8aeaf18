"""The controller's MQTT v5 session: every agent's status, telemetry and events in, alerts out.

A persistent session (``clean_start=False`` with a session expiry) makes the broker queue what
arrives while the controller restarts; retained statuses tell a fresh controller which hosts
exist and which are offline. Connection loss ends the session; the outer loop reconnects with
jittered exponential backoff, forever, until stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from llm_ops_helper.backoff import backoff_delay
from llm_ops_helper.controller.config import BrokerConfig
from llm_ops_helper.controller.sinks import MqttSink
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.topics import ALERTS, TopicKind, all_agents

log = structlog.get_logger("llmops.controller.mqtt")

SUBSCRIPTIONS = (TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.RESULTS)


class ControllerLink:
    def __init__(self, config: BrokerConfig, handle: Callable[[str, bytes], None],
                 alerts: MqttSink, password: str | None = None) -> None:
        self.config = config
        self.handle = handle
        self.alerts = alerts
        self.password = password
        self.connects = 0
        self.connected = False

    def _client(self) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        return aiomqtt.Client(
            self.config.host, self.config.port, identifier=self.config.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
            keepalive=self.config.keepalive_s, properties=properties,
            username=self.config.username or None, password=self.password,
            # Messages wait in aiomqtt's queue while a batch is scored: no cap, so none is lost.
            max_queued_incoming_messages=0,
        )

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            connects = self.connects
            try:
                await self._session(stop)
                return
            except* aiomqtt.MqttError as group:
                error = "; ".join(str(e) for e in group.exceptions)
            self.connected = False
            if self.connects > connects:
                failures = 0
            delay = backoff_delay(failures, self.config.reconnect_min_s,
                                  self.config.reconnect_max_s)
            failures += 1
            log.warning("broker_unreachable", broker=f"{self.config.host}:{self.config.port}",
                        error=error, retry_in_s=round(delay, 2))
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass

    async def _session(self, stop: asyncio.Event) -> None:
        async with self._client() as client:
            self.connects += 1
            await client.subscribe([(all_agents(kind), 1) for kind in SUBSCRIPTIONS])
            self.connected = True
            log.info("broker_connected", broker=f"{self.config.host}:{self.config.port}",
                     connects=self.connects)
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._receive(client)),
                         tg.create_task(self._publish_alerts(client))]
                await stop.wait()
                for task in tasks:
                    task.cancel()
        self.connected = False
        log.info("broker_disconnected", reason="shutdown")

    async def _receive(self, client: aiomqtt.Client) -> None:
        handle = self.handle
        async for message in client.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                handle(message.topic.value, bytes(payload))

    async def _publish_alerts(self, client: aiomqtt.Client) -> None:
        while True:
            alert = await self.alerts.queue.get()
            await client.publish(ALERTS, encode(alert), qos=1)
