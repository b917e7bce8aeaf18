"""Real agent processes and MQTT recorders for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from llm_ops_helper.broker import LocalMosquitto
from llm_ops_helper.proto import codec
from llm_ops_helper.proto.topics import AgentTopic


def agent_config(mqtt: LocalMosquitto, /, host: str = "gpu-test",
                 **sections: dict[str, Any]) -> str:
    """An agent TOML for tests: simulated GPUs, a short keepalive, quick reconnects."""
    base: dict[str, dict[str, Any]] = {
        "broker": {"host": mqtt.host, "port": mqtt.port, "keepalive_s": 4,
                   "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "telemetry": {"interval_s": 0.5},
        "gpus": {"backend": "simulated", "simulated_count": 8},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    # Never the system's /var/lib/llmops-agent: a directory of the test's own, beside the
    # broker's (tests run as root in CI).
    base.setdefault("supervisor", {}).setdefault(
        "state_dir", str(mqtt.data_dir.parent / f"agent-{host}"))
    base["supervisor"].setdefault("bind_host", "127.0.0.1")
    base["supervisor"].setdefault("advertise_host", "127.0.0.1")
    lines = [f'host = "{host}"']
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


class DaemonProcess:
    """``python -m MODULE --config FILE`` as a child process, logs to a file."""

    module = ""

    def __init__(self, workdir: Path, config_text: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        name = self.module.rsplit(".", 1)[-1]
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (code := self.process.poll()) is None:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.module} still running after {timeout_s} s")
            await asyncio.sleep(0.02)
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)
            await self.wait(5)


class AgentProcess(DaemonProcess):
    module = "llm_ops_helper.agent"


class ControllerProcess(DaemonProcess):
    module = "llm_ops_helper.controller"


def controller_config(mqtt: LocalMosquitto, /, state_dir: Path, http_port: int,
                      **sections: dict[str, Any]) -> str:
    """A controller TOML for tests: quick reconnects, a private state directory."""
    base: dict[str, dict[str, Any]] = {
        "broker": {"host": mqtt.host, "port": mqtt.port, "keepalive_s": 4,
                   "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "http": {"host": "127.0.0.1", "port": http_port},
        "state": {"dir": str(state_dir)},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Recorder:
    """Records every message on a topic filter, reconnecting through broker restarts.

    ``persistent=True`` uses a persistent session, as the controller does, so messages published
    while the recorder is reconnecting are queued by the broker and still arrive.
    """

    def __init__(self, broker: LocalMosquitto, topic: str = "llmops/v1/#",
                 identifier: str | None = None, persistent: bool = False) -> None:
        self.broker = broker
        self.topic = topic
        self.identifier = identifier
        self.persistent = persistent
        self.messages: list[aiomqtt.Message] = []
        self.arrived_at: list[float] = []  # wall time each message arrived
        self.connected = asyncio.Event()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self.connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600 if self.persistent else 0
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host, self.broker.port, identifier=self.identifier,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=not self.persistent,
                    properties=properties,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        self.messages.append(message)
                        self.arrived_at.append(time.time())
                        self._arrived.set()
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def of(self, kind: str, type_: type[Any]) -> list[Any]:
        """Decoded payloads of one topic kind, in arrival order."""
        out = []
        for message in self.messages:
            if AgentTopic.parse(str(message.topic)).kind.value == kind:
                assert isinstance(message.payload, bytes)
                out.append(codec.decode(message.payload, type_))
        return out

    async def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (result := predicate()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                                     f"{len(self.messages)} messages recorded")
            self._arrived.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.25)):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        return result


async def publish(broker: LocalMosquitto, topic: str, payload: bytes | msgspec.Struct,
                  retain: bool = False) -> None:
    data = payload if isinstance(payload, bytes) else codec.encode(payload)
    async with aiomqtt.Client(broker.host, broker.port,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.publish(topic, data, qos=1, retain=retain)
