"""sd_notify over a real datagram socket, from a real agent process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from llm_ops_helper.broker import LocalMosquitto
from llm_ops_helper.systemd_notify import Notifier
from tests.integration.harness import agent_config


def _socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    return sock


def test_notifier_is_silent_without_notify_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_notifier_sends_ready_and_only_pings_an_enabled_watchdog(tmp_path: Path) -> None:
    with _socket(tmp_path / "notify") as sock:
        plain = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert plain.ready("up")
        assert sock.recv(256) == b"READY=1\nSTATUS=up"
        assert plain.watchdog() is False  # no WATCHDOG_USEC: systemd did not ask
        watched = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "4000000"})
        assert watched.watchdog_interval_s == 2.0
        assert watched.watchdog()
        assert sock.recv(256) == b"WATCHDOG=1"


def test_notifier_addresses_abstract_sockets() -> None:
    name = f"llmops-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(64) == b"STOPPING=1"


async def test_agent_process_notifies_ready_watchdog_and_stopping(tmp_path: Path,
                                                                  mosquitto: LocalMosquitto) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(agent_config(mosquitto))
    with _socket(tmp_path / "notify") as sock:
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "2000000"}
        agent = subprocess.Popen([sys.executable, "-m", "llm_ops_helper.agent", "--config",
                                  str(config)], env=env, stdout=subprocess.DEVNULL)
        try:
            seen = [sock.recv(256) for _ in range(3)]
            assert any(m.startswith(b"READY=1") for m in seen)
            assert b"WATCHDOG=1" in seen
            agent.send_signal(signal.SIGTERM)
            while (message := sock.recv(256)) != b"STOPPING=1":
                assert message == b"WATCHDOG=1"
            assert agent.wait(10) == 0
        finally:
            agent.kill()
