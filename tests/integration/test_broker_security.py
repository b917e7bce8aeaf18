"""The shipped TLS broker config and ACL (systemd/mosquitto-tls.conf, mosquitto.acl) on a real
Mosquitto: TLS only, passwords only, and an agent can speak only for itself.

Certificates come from the ``openssl`` CLI, the password file from ``mosquitto_passwd``
(:mod:`tests.integration.tlsbroker`).
The real controller process on this broker, commanding a real agent: test_tls_fleet.py.
Absence of a message is shown without timing: a denied publish (QoS 1, acknowledged) is
followed by an allowed marker from the same client, and the witness sees the marker first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest

from llm_ops_helper.broker import LocalMosquitto, Pki
from llm_ops_helper.brokertls import client_context
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.messages import Telemetry
from tests.integration.harness import AgentProcess, agent_config
from tests.integration.tlsbroker import (
    CONTROLLER,
    make_test_pki,
    secret_file,
    start_secure_broker,
    tls_login,
)

PASSWORDS = {CONTROLLER: "controller-secret", "gpu-a": "a-secret", "gpu-b": "b-secret"}
AGENTS = "llmops/v1/agents"
WAIT_S = 10.0  # an upper bound on waiting for what must arrive, never a measured threshold


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_test_pki(tmp_path / "pki")


@pytest.fixture
async def secure_broker(tmp_path: Path, pki: Pki) -> AsyncIterator[LocalMosquitto]:
    broker = await start_secure_broker(tmp_path, pki, PASSWORDS)
    try:
        yield broker
    finally:
        await broker.stop()


@asynccontextmanager
async def connect(broker: LocalMosquitto, pki: Pki, user: str, *, password: str | None = None,
                  tls: bool = True, client_cert: bool = False) -> AsyncIterator[aiomqtt.Client]:
    context = client_context(str(pki.ca), str(pki.client_cert) if client_cert else "",
                             str(pki.client_key) if client_cert else "") if tls else None
    async with aiomqtt.Client(
            broker.host, broker.port, identifier=f"{user}-{uuid.uuid4().hex[:8]}",
            username=user, password=PASSWORDS[user] if password is None else password,
            protocol=aiomqtt.ProtocolVersion.V5, tls_context=context, timeout=WAIT_S) as client:
        yield client


class Witness:
    """A subscriber that records every (topic, payload) it receives, in order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[tuple[str, bytes]] = []
        self._new = asyncio.Event()

    async def run(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            self.seen.append((message.topic.value, message.payload))
            self._new.set()

    async def until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including ``(topic, payload)``."""
        async with asyncio.timeout(WAIT_S):
            while (topic, payload) not in self.seen:
                self._new.clear()
                await self._new.wait()
        return self.seen[:self.seen.index((topic, payload)) + 1]


@asynccontextmanager
async def witness(broker: LocalMosquitto, pki: Pki, user: str, *topics: str
                  ) -> AsyncIterator[Witness]:
    async with connect(broker, pki, user) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        seen = Witness(client)
        task = asyncio.create_task(seen.run())
        try:
            yield seen
        finally:
            task.cancel()


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


async def raw_connect(broker: LocalMosquitto, user: str, context: ssl.SSLContext | None
                      ) -> bytes:
    """Send an MQTT 3.1.1 CONNECT with ``user``'s password; the broker's first bytes back
    (``b""`` when it closes the connection instead). Handshake errors propagate."""
    body = (_utf8("MQTT") + bytes([4, 0xC2, 0, 60]) + _utf8(f"raw-{uuid.uuid4().hex[:8]}")
            + _utf8(user) + _utf8(PASSWORDS[user]))
    reader, writer = await asyncio.open_connection(
        broker.host, broker.port, ssl=context, server_hostname=broker.host if context else None)
    try:
        writer.write(bytes([0x10, len(body)]) + body)
        await writer.drain()
        async with asyncio.timeout(WAIT_S):
            try:
                return await reader.read(4)
            except ConnectionResetError:
                return b""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


CONNACK_ACCEPTED = bytes([0x20, 2, 0, 0])


async def test_plain_mqtt_is_refused_on_the_tls_listener(secure_broker, pki) -> None:
    assert await raw_connect(secure_broker, CONTROLLER, client_context(str(pki.ca), "", "")) \
        == CONNACK_ACCEPTED
    assert await raw_connect(secure_broker, CONTROLLER, None) == b""


async def test_a_wrong_password_is_refused(secure_broker, pki) -> None:
    with pytest.raises(aiomqtt.MqttCodeError):
        async with connect(secure_broker, pki, "gpu-a", password="not-the-password"):
            pass
    with pytest.raises(aiomqtt.MqttCodeError):
        async with connect(secure_broker, pki, "gpu-a", password=""):
            pass


async def test_an_agent_publishes_only_under_its_own_host(secure_broker, pki) -> None:
    async with witness(secure_broker, pki, CONTROLLER, f"{AGENTS}/+/#") as controller, \
            connect(secure_broker, pki, "gpu-a") as agent_a:
        own = f"{AGENTS}/gpu-a/telemetry"
        await agent_a.publish(own, b"mine", qos=1)
        assert await controller.until(own, b"mine") == [(own, b"mine")]

        forged = [f"{AGENTS}/gpu-b/{kind}" for kind in ("status", "telemetry", "events",
                                                        "results")]
        for topic in forged:
            await agent_a.publish(topic, b"forged", qos=1)
        await agent_a.publish(own, b"marker", qos=1)
        seen = await controller.until(own, b"marker")
        assert [t for t, p in seen if p == b"forged"] == []


async def test_no_agent_can_publish_a_command(secure_broker, pki) -> None:
    async with witness(secure_broker, pki, CONTROLLER, f"{AGENTS}/+/#",
                       "llmops/v1/alerts") as controller, \
            witness(secure_broker, pki, "gpu-b", f"{AGENTS}/gpu-b/commands") as agent_b, \
            connect(secure_broker, pki, "gpu-a") as agent_a:
        for host in ("gpu-a", "gpu-b"):
            await agent_a.publish(f"{AGENTS}/{host}/commands", b"forged-command", qos=1)
        await agent_a.publish("llmops/v1/alerts", b"forged-command", qos=1)
        await agent_a.publish(f"{AGENTS}/gpu-a/telemetry", b"marker", qos=1)
        seen = await controller.until(f"{AGENTS}/gpu-a/telemetry", b"marker")
        assert [t for t, p in seen if p == b"forged-command"] == []
        # gpu-b's own view: the controller's command arrives, gpu-a's forgery never did.
        await controller.client.publish(f"{AGENTS}/gpu-b/commands", b"real", qos=1)
        assert await agent_b.until(f"{AGENTS}/gpu-b/commands", b"real") == [
            (f"{AGENTS}/gpu-b/commands", b"real")]


async def test_an_agent_cannot_read_another_hosts_commands(secure_broker, pki) -> None:
    async with witness(secure_broker, pki, "gpu-b", f"{AGENTS}/gpu-b/commands") as agent_b, \
            witness(secure_broker, pki, "gpu-a", f"{AGENTS}/gpu-b/commands",
                    f"{AGENTS}/gpu-a/commands", f"{AGENTS}/+/commands") as agent_a, \
            connect(secure_broker, pki, CONTROLLER) as controller:
        await controller.publish(f"{AGENTS}/gpu-b/commands", b"for-b", qos=1)
        await controller.publish(f"{AGENTS}/gpu-a/commands", b"for-a", qos=1)
        assert await agent_b.until(f"{AGENTS}/gpu-b/commands", b"for-b") == [
            (f"{AGENTS}/gpu-b/commands", b"for-b")]
        seen = await agent_a.until(f"{AGENTS}/gpu-a/commands", b"for-a")
        assert [p for _, p in seen if p == b"for-b"] == []


async def test_client_certificates_when_the_broker_requires_them(tmp_path, pki) -> None:
    broker = await start_secure_broker(tmp_path, pki, PASSWORDS, require_certificate=True)
    try:
        with_cert = client_context(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        assert await raw_connect(broker, "gpu-a", with_cert) == CONNACK_ACCEPTED
        try:
            refused = await raw_connect(broker, "gpu-a", client_context(str(pki.ca), "", ""))
        except ssl.SSLError as exc:
            refused = (exc.reason or str(exc)).encode()
        assert refused in (b"", b"TLSV13_ALERT_CERTIFICATE_REQUIRED")
        async with connect(broker, pki, "gpu-a", client_cert=True) as agent_a:
            await agent_a.publish(f"{AGENTS}/gpu-a/telemetry", b"ok", qos=1)
    finally:
        await broker.stop()


async def test_a_real_agent_over_tls_with_its_password_reaches_the_controller(
        secure_broker, pki, tmp_path) -> None:
    secret = secret_file(tmp_path / "gpu-a.password", PASSWORDS["gpu-a"])
    config = agent_config(secure_broker, host="gpu-a",
                          broker=tls_login(secure_broker, pki, "gpu-a", secret))
    agent = AgentProcess(tmp_path / "agent", config)
    topic = f"{AGENTS}/gpu-a/telemetry"
    async with connect(secure_broker, pki, CONTROLLER) as controller:
        await controller.subscribe(topic, qos=1)
        agent.start()
        try:
            async with asyncio.timeout(WAIT_S):
                async for message in controller.messages:
                    assert isinstance(message.payload, bytes)
                    snapshot = codec.decode(message.payload, Telemetry)
                    break
        except TimeoutError:
            pytest.fail(f"no telemetry from the TLS agent; its log:\n{agent.log()}")
        finally:
            await agent.close()
    assert snapshot.host == "gpu-a" and len(snapshot.gpus) == 8


async def agent_log_once_it_retried(tmp_path, broker, login, event: str) -> str:
    """Run agent gpu-a with ``login`` until it logged ``event`` twice (a failed connect, then
    a retry); its log."""
    agent = AgentProcess(tmp_path / "agent", agent_config(broker, host="gpu-a", broker=login))
    agent.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while agent.log().count(event) < 2:
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"no repeated {event} in the agent's log:\n{agent.log()}")
    finally:
        await agent.close()
    return agent.log()


async def test_an_agent_with_the_wrong_ca_logs_the_tls_failure_and_retries(
        secure_broker, tmp_path) -> None:
    other = make_test_pki(tmp_path / "other-pki")
    secret = secret_file(tmp_path / "gpu-a.password", PASSWORDS["gpu-a"])
    log = await agent_log_once_it_retried(
        tmp_path, secure_broker, tls_login(secure_broker, other, "gpu-a", secret),
        "broker_tls_failed")
    assert str(other.ca) in log
    assert "CERTIFICATE_VERIFY_FAILED" in log


async def test_an_agent_with_a_wrong_password_logs_which_login_to_check_and_retries(
        secure_broker, pki, tmp_path) -> None:
    secret = secret_file(tmp_path / "gpu-a.password", "not-the-password")
    log = await agent_log_once_it_retried(
        tmp_path, secure_broker, tls_login(secure_broker, pki, "gpu-a", secret),
        "broker_unreachable")
    refused = [line for line in log.splitlines() if "broker_unreachable" in line]
    assert "the broker refused user 'gpu-a'" in refused[0]
    assert str(secret) in refused[0]
