"""The shipped unit file and broker config are valid for the real tools that read them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from llm_ops_helper.broker import LocalMosquitto, config_text

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"


def _unit(name: str = "llmops-agent") -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(SYSTEMD / f"{name}.service")
    return unit


def test_agent_unit_has_the_promised_lifecycle_and_sandbox() -> None:
    service = _unit()["Service"]
    expected = {"Type": "notify", "Restart": "on-failure", "RestartPreventExitStatus": "78",
                "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                "PrivateTmp": "yes", "User": "llmops"}
    assert {k: service.get(k) for k in expected} == expected
    assert int(service["WatchdogSec"]) >= 10
    # NVML needs the NVIDIA device nodes even with DevicePolicy=closed.
    assert "char-nvidia-frontend rw" in (SYSTEMD / "llmops-agent.service").read_text()


def test_controller_unit_has_the_same_lifecycle_and_hardening_as_the_agent() -> None:
    agent, controller = _unit()["Service"], _unit("llmops-controller")["Service"]
    same = ("Type", "Restart", "RestartPreventExitStatus", "NoNewPrivileges", "ProtectSystem",
            "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
            "ProtectControlGroups", "RestrictSUIDSGID", "RestrictNamespaces",
            "CapabilityBoundingSet", "User", "WatchdogSec")
    assert {k: controller.get(k) for k in same} == {k: agent.get(k) for k in same}
    assert controller["ReadWritePaths"] == "/var/lib/llmops-controller"
    assert controller["ExecStart"].endswith("--config /etc/llmops/controller.toml")


@pytest.mark.parametrize("name", ["llmops-agent", "llmops-controller"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing; install it with: apt-get install -y systemd")
    program = Path(sys.executable).with_name(name)
    text = (SYSTEMD / f"{name}.service").read_text()
    unit = tmp_path / f"{name}.service"
    unit.write_text(text.replace(f"/opt/llmops/venv/bin/{name}", str(program)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


async def test_shipped_mosquitto_conf_runs_a_v5_broker_with_persistence(tmp_path: Path) -> None:
    conf = (SYSTEMD / "mosquitto.conf").read_text()
    assert "max_queued_messages 500000" in conf and "persistence true" in conf
    broker = LocalMosquitto(tmp_path)  # runs the shipped file, listener and paths made local
    assert "max_queued_messages 500000" in config_text(broker.port, tmp_path)
    await broker.start()
    try:
        async with aiomqtt.Client(broker.host, broker.port,
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe("t/#", qos=1)
            await client.publish("t/x", b"ok", qos=1)
            async for message in client.messages:
                assert message.payload == b"ok"
                break
    finally:
        await broker.stop()
    assert (tmp_path / "mosquitto.db").exists(), "persistence did not write its database"
