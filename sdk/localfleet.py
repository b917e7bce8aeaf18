"""A whole fleet on one machine: Mosquitto, the controller and N agents as real processes.

What the end-to-end tests, ``bench/deploy.py`` and the demo run. Agents have simulated GPUs
(NVML where ``gpus_backend="auto"`` finds a driver), their replicas listen on 127.0.0.1, and
every command is signed with a fleet key written into the work directory. Nothing is shared
with a system installation: configs, state, logs and keys all live under ``workdir``.

Stopping is thorough, because a replica is a process group of its own that outlives a killed
agent by design: agents stop with SIGTERM (``stop_replicas_on_exit``), then any replica process
group an agent's state file still names is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_ops_helper.broker import LocalMosquitto, free_port

KEY_ID = "fleet"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def toml_document(top: dict[str, Any], tables: dict[str, Any]) -> str:
    """Top-level keys, then tables (a dict) and arrays of tables (a list of dicts)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, values in tables.items():
        if isinstance(values, list):  # an array of tables
            for item in values:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
            continue
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, values in overrides.items():
        if isinstance(values, dict) and isinstance(out.get(name), dict):
            out[name].update(values)
        else:
            out[name] = values
    return out


class Daemon:
    """``python -m MODULE --config FILE`` as a child process in its own session, logs to a file
    (its own session: a Ctrl-C meant for the caller does not reach it first)."""

    def __init__(self, module: str, name: str, workdir: Path, config_text: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.module, self.name = module, name
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running after {timeout_s} s")
            await asyncio.sleep(0.02)
        return code

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.wait(5.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class AgentHandle:
    host: str
    daemon: Daemon
    state_dir: Path

    def replica_groups(self) -> dict[str, int]:
        """Replica name -> process group id, as the agent's state file records them."""
        path = self.state_dir / "replicas.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        for record in data.get("replicas", []):
            pgid = record.get("pgid") or record.get("pid")
            name = record.get("spec", {}).get("name")
            if name and isinstance(pgid, int):
                out[name] = pgid
        return out


@dataclass
class LocalFleet:
    workdir: Path
    agents_count: int = 2
    gpus_per_agent: int = 2
    gpu_profile: str = "a10g"
    interval_s: float = 0.5
    gpus_backend: str = "simulated"
    # Extra TOML tables (merged over the defaults) for every agent and for the controller.
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    controller_overrides: dict[str, Any] = field(default_factory=dict)
    host_prefix: str = "gpu"
    broker: LocalMosquitto | None = None
    controller: Daemon | None = None
    agents: list[AgentHandle] = field(default_factory=list)
    http_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def key_path(self) -> Path:
        return self.workdir / "keys" / f"{KEY_ID}.key"

    @property
    def token_path(self) -> Path:
        """An admin API token, registered by the controller at start-up as "bootstrap"."""
        return self.workdir / "admin.token"

    @property
    def token(self) -> str:
        """The admin token: ``LLMOpsHelper(fleet.url, token=fleet.token)``."""
        self._write_token()
        return self.token_path.read_text().strip()

    def _write_token(self) -> None:
        if not self.token_path.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.token_path.touch(0o600)
            # As controller.auth.new_token: prefixed, so never taken for a CLI option.
            self.token_path.write_text("llmops_" + secrets.token_urlsafe(32) + "\n")

    def _write_key(self) -> None:
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.key_path.exists():
            self.key_path.write_text(secrets.token_hex(32))
            self.key_path.chmod(0o600)

    def _broker_table(self) -> dict[str, Any]:
        assert self.broker is not None
        return {"host": self.broker.host, "port": self.broker.port, "keepalive_s": 5,
                "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}

    def controller_toml(self) -> str:
        tables = merge({
            "broker": self._broker_table(),
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "state": {"dir": str(self.workdir / "controller-state")},
            "commands": {"key_id": KEY_ID, "key_file": str(self.key_path)},
            "api": {"bootstrap_token_file": str(self.token_path)},
        }, self.controller_overrides)
        return toml_document({"log_level": "info"}, tables)

    def agent_toml(self, host: str, state_dir: Path) -> str:
        tables = merge({
            "broker": self._broker_table(),
            "telemetry": {"interval_s": self.interval_s},
            "gpus": {"backend": self.gpus_backend, "simulated_count": self.gpus_per_agent,
                     "simulated_profile": self.gpu_profile},
            "supervisor": {"state_dir": str(state_dir), "bind_host": "127.0.0.1",
                           "advertise_host": "127.0.0.1", "stop_grace_s": 5.0,
                           "restart_backoff_min_s": 0.25, "restart_backoff_max_s": 2.0,
                           "stop_replicas_on_exit": True},
            "commands": {"keys": [{"id": KEY_ID, "file": str(self.key_path)}]},
        }, self.agent_overrides)
        return toml_document({"host": host}, tables)

    def add_agent(self, host: str | None = None) -> AgentHandle:
        host = host or f"{self.host_prefix}-{len(self.agents) + 1:02d}"
        state_dir = self.workdir / host / "state"
        daemon = Daemon("llm_ops_helper.agent", host, self.workdir / host,
                        self.agent_toml(host, state_dir))
        handle = AgentHandle(host, daemon, state_dir)
        self.agents.append(handle)
        return handle

    async def start(self, timeout_s: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_key()
        self._write_token()
        self.broker = LocalMosquitto(self.workdir / "mosquitto")
        await self.broker.start()
        self.http_port = free_port()
        self.controller = Daemon("llm_ops_helper.controller", "controller", self.workdir,
                                 self.controller_toml())
        self.controller.start()
        for _ in range(self.agents_count):
            self.add_agent().daemon.start()
        await self.wait_ready(timeout_s)

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the controller answers and has telemetry from every agent (placement needs
        its GPUs' free memory)."""
        deadline = time.monotonic() + timeout_s
        wanted = {a.host for a in self.agents}
        online: set[str] = set()
        while time.monotonic() < deadline:
            assert self.controller is not None
            if not self.controller.running:
                raise RuntimeError(f"the controller exited: {self.controller.log()[-2000:]}")
            try:
                hosts = (await asyncio.to_thread(self.get, "/api/v1/hosts"))["hosts"]
                online = {h["host"] for h in hosts if h["online"] and h["last_ts"]}
                if wanted <= online:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"fleet not ready after {timeout_s} s: online {sorted(online)} of "
                           f"{sorted(wanted)}")

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    async def stop(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.daemon.stop()
        for agent in self.agents:
            for pgid in agent.replica_groups().values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        if self.controller is not None:
            with contextlib.suppress(Exception):
                await self.controller.stop()
        if self.broker is not None:
            await self.broker.stop()

    async def __aenter__(self) -> LocalFleet:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def openai_chat(url: str, model: str, prompt: str = "Hello", max_tokens: int = 8,
                timeout_s: float = 30.0) -> dict[str, Any]:
    """One non-streaming chat completion against a replica (or anything OpenAI-compatible)."""
    body = json.dumps({"model": model, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        result: dict[str, Any] = json.load(response)
        return result


