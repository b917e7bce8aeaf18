"""A private Mosquitto on a free loopback port, for the demo and the tests.

Never the system broker: each instance has its own port, config, persistence directory and
log, so a test can stop, kill and restart it at will.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import signal
import socket
import subprocess
from importlib import resources
from pathlib import Path

INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto"


class BrokerUnavailable(RuntimeError):
    pass


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise BrokerUnavailable(f"mosquitto is not installed; {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config_text(port: int, data_dir: Path) -> str:
    """The shipped systemd/mosquitto.conf, so tests run the broker settings users get, on a
    loopback port with its own persistence directory and log."""
    shipped = (resources.files("llm_ops_helper.systemd") / "mosquitto.conf").read_text()
    for production, local in (("listener 1883", f"listener {port} 127.0.0.1"),
                              ("persistence_location /var/lib/mosquitto/",
                               f"persistence_location {data_dir}/")):
        if production not in shipped:
            raise BrokerUnavailable(f"systemd/mosquitto.conf no longer has {production!r}")
        shipped = shipped.replace(production, local)
    return shipped + f"\nlog_dest file {data_dir}/mosquitto.log\nuser {getpass.getuser()}\n"


class LocalMosquitto:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.binary = mosquitto_binary()
        self.data_dir = data_dir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.config_path = data_dir / "mosquitto.conf"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    async def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config_text(self.port, self.data_dir))
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self._process.poll() is not None:
                stderr = self._process.stderr
                err = stderr.read().decode(errors="replace").strip() if stderr else ""
                raise BrokerUnavailable(
                    f"mosquitto exited with {self._process.returncode}: {err}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise BrokerUnavailable(f"mosquitto did not listen on {self.host}:{self.port} "
                                f"within {timeout_s} s; see {self.log_path}")

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        """Stop the broker (SIGTERM saves its persistence; SIGKILL does not)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while process.poll() is None:
            if loop.time() > deadline:
                process.kill()
            await asyncio.sleep(0.02)
        if process.stderr:
            process.stderr.close()
        self._process = None

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)
