"""The controller's MQTT v5 session: every agent's status, telemetry and events in, alerts out.

A persistent session (``clean_start=False`` with a session expiry) makes the broker queue what
arrives while the controller restarts; retained statuses tell a fresh controller which hosts
exist and which are offline. Connection loss ends the session; the outer loop reconnects with
jittered exponential backoff, forever, until stop.

Flow control: each message is acknowledged only after ingest has handled it, and the CONNECT
asks for at most :data:`RECEIVE_MAXIMUM` unacknowledged messages in flight. A backlog therefore
waits in the broker (which persists it), not in this process's memory, and what a crash or a
dropped session interrupts is delivered again rather than lost (paho would otherwise acknowledge
each message the moment it is read, before the controller has looked at it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiomqtt
import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from llm_ops_helper.brokertls import connect_hint, handshake_hint, settings_context
from llm_ops_helper.controller.config import BrokerConfig
from llm_ops_helper.controller.sinks import MqttSink
from llm_ops_helper.lifecycle import reconnect_forever
from llm_ops_helper.proto.codec import encode
from llm_ops_helper.proto.topics import ALERTS, TopicKind, all_agents

log = structlog.get_logger("llmops.controller.mqtt")

SUBSCRIPTIONS = (TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.RESULTS)
RECEIVE_MAXIMUM = 512
# An alert publish waits this long for the broker's acknowledgement; a timeout is logged and
# counted (the alert is in SQLite), never a reason to drop the session and what it carries.
ALERT_PUBLISH_TIMEOUT_S = 30.0


class ControllerLink:
    def __init__(self, config: BrokerConfig, handle: Callable[[str, bytes | bytearray], None],
                 alerts: MqttSink, commands: asyncio.Queue[tuple[str, bytes, float]],
                 password: str | None = None) -> None:
        self.config = config
        self.handle = handle
        self.alerts = alerts
        self.password = password
        self.connects = 0
        self.connected = False
        self.internal_errors = 0
        self.alert_publish_failures = 0
        # Signed commands for agents, (topic, payload, expires_at), sent QoS 1 in order. The
        # queue is bounded and filled only while the link is up; one that expired waiting
        # (the link dropped with it queued) is dropped and counted, not sent: the agent would
        # refuse it. The agent's persistent session queues it in the broker while the agent
        # is away; its ``expires_at`` bounds how late it acts.
        self.commands = commands
        self.command_publish_failures = 0
        self.commands_expired = 0
        self.clock: Callable[[], float] = time.time

    def _client(self) -> aiomqtt.Client:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.config.session_expiry_s
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            self.config.host, self.config.port, identifier=self.config.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
            keepalive=self.config.keepalive_s, properties=properties,
            username=self.config.username or None, password=self.password,
            tls_context=settings_context(self.config),
        )
        # aiomqtt does not expose paho's manual acknowledgement; its paho client does.
        client._client.manual_ack_set(True)
        # Straight from paho's read loop (which aiomqtt drives on this event loop) to ingest,
        # set before connecting so that a persistent session's backlog, sent right after the
        # CONNACK, takes the same path: aiomqtt's iterator costs a task and an asyncio.wait per
        # message, about as much as everything ingest does with it.
        client._client.on_message = self._on_message
        return client

    async def run(self, stop: asyncio.Event) -> None:
        def on_error(error: str, delay: float) -> None:
            self.connected = False
            tls_hint = handshake_hint(error, self.config.ca_file) if self.config.tls else None
            log.warning("broker_tls_failed" if tls_hint else "broker_unreachable",
                        broker=f"{self.config.host}:{self.config.port}", error=error,
                        hint=tls_hint or connect_hint(error, self.config),
                        retry_in_s=round(delay, 2))

        await reconnect_forever(lambda: self._session(stop), stop,
                                low=self.config.reconnect_min_s,
                                high=self.config.reconnect_max_s,
                                connects=lambda: self.connects, on_error=on_error)

    async def _session(self, stop: asyncio.Event) -> None:
        async with self._client() as client:
            self.connects += 1
            await client.subscribe([(all_agents(kind), 1) for kind in SUBSCRIPTIONS])
            self.connected = True
            log.info("broker_connected", broker=f"{self.config.host}:{self.config.port}",
                     connects=self.connects)
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._until_disconnected(client)),
                         tg.create_task(self._publish_alerts(client)),
                         tg.create_task(self._publish_commands(client))]
                await stop.wait()
                for task in tasks:
                    task.cancel()
        self.connected = False
        log.info("broker_disconnected", reason="shutdown")

    async def _until_disconnected(self, client: aiomqtt.Client) -> None:
        # Messages do not go through aiomqtt's queue (see _client); its iterator still raises
        # MqttError when the connection drops, which ends the session.
        async for message in client.messages:  # none, unless aiomqtt changes its wiring
            self._on_message(client._client, None, message)

    def _on_message(self, paho: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage | aiomqtt.Message) -> None:
        try:
            topic = message.topic if isinstance(message.topic, str) else message.topic.value
            self.handle(topic, message.payload)
        except Exception:
            # A bug, not bad input (ingest drops that with a reason): log it and go on, or the
            # unacknowledged message would come back and kill every session after.
            self.internal_errors += 1
            log.exception("ingest_internal_error", mid=message.mid)
        finally:
            paho.ack(message.mid, message.qos)

    async def _publish_commands(self, client: aiomqtt.Client) -> None:
        while True:
            topic, payload = await self.next_command()
            try:
                await client.publish(topic, payload, qos=1, timeout=ALERT_PUBLISH_TIMEOUT_S)
            except aiomqtt.MqttError as exc:
                # The reconciler sends again what an agent does not act on; count and go on.
                self.command_publish_failures += 1
                log.warning("command_publish_failed", topic=topic, error=str(exc))

    async def next_command(self) -> tuple[str, bytes]:
        """The next queued command still within its expiry; expired ones dropped, counted."""
        while True:
            topic, payload, expires_at = await self.commands.get()
            if expires_at >= self.clock():
                return topic, payload
            self.commands_expired += 1
            log.warning("command_expired_unsent", topic=topic)

    async def _publish_alerts(self, client: aiomqtt.Client) -> None:
        while True:
            alert = await self.alerts.queue.get()
            try:
                await client.publish(ALERTS, encode(alert), qos=1,
                                     timeout=ALERT_PUBLISH_TIMEOUT_S)
            except aiomqtt.MqttError as exc:
                self.alert_publish_failures += 1
                log.warning("alert_publish_failed", alert_id=alert.id, error=str(exc))
