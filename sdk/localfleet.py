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
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_ops_helper.broker import LocalMosquitto, die_with_parent, free_port

KEY_ID = "fleet"


def pick_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` if nothing listens there now (a bind succeeds), else a free port."""
    with socket.socket() as sock:
        # As the daemons bind (asyncio's reuse_address): a port a previous run left in
        # TIME_WAIT is free to them, so it is free here too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, preferred))
        except OSError:
            return free_port()
    return preferred


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


def gateway_toml(controller_url: str, port: int, state_dir: Path,
                 keys: Sequence[Mapping[str, Any]], *, token_file: Path | None = None,
                 log_level: str = "info", tables: Mapping[str, Any] | None = None) -> str:
    """An ``llmops-gateway`` config in front of ``controller_url``. ``keys``: tables with the
    API key itself under ``key`` (only its sha256 is written) and any other key settings;
    ``tables`` are merged over the defaults (``{"guards.on": {...}}`` adds a table)."""
    controller: dict[str, Any] = {"url": controller_url, "refresh_s": 0.5}
    if token_file is not None:
        controller["token_file"] = str(token_file)
    merged = merge({"http": {"host": "127.0.0.1", "port": port}, "controller": controller,
                    "state": {"dir": str(state_dir), "flush_s": 1.0}}, dict(tables or {}))
    merged["keys"] = [{"name": k["name"], "sha256": hashlib.sha256(k["key"].encode()).hexdigest(),
                       **{n: v for n, v in k.items() if n not in ("name", "key")}}
                      for k in keys]
    return toml_document({"log_level": log_level}, merged)


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

    def start(self, env: Mapping[str, str] | None = None, parent_death: bool = False) -> None:
        """``env``: added to the inherited environment; ``parent_death``: the kernel sends
        SIGTERM when the starting thread dies (:func:`die_with_parent`), so an agent stops its
        replicas even when whoever started it was killed."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **env} if env else None,
                preexec_fn=die_with_parent() if parent_death else None)

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
    # Per host (by name): TOML tables merged over agent_overrides for that agent only.
    host_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The controller's HTTP port if it is free at start, else any free one (None: any).
    preferred_http_port: int | None = None
    broker: LocalMosquitto | None = None
    controller: Daemon | None = None
    gateway: Daemon | None = None
    agents: list[AgentHandle] = field(default_factory=list)
    http_port: int = 0
    gateway_port: int = 0
    # Added to every process's environment (replicas inherit it): a mark to find them by.
    env: dict[str, str] = field(default_factory=dict)
    # Daemons and the broker get SIGTERM when the thread that started them dies.
    parent_death: bool = False

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
        return toml_document({"host": host}, merge(tables, self.host_overrides.get(host, {})))

    def gateway_toml(self, port: int, keys: dict[str, str]) -> str:
        """An ``llmops-gateway`` config in front of this fleet's controller; ``keys`` maps a
        key name to the API key itself (only its sha256 is written)."""
        return gateway_toml(self.url, port, self.workdir / "gateway-state",
                            [{"name": n, "key": k, "models": ["*"]} for n, k in keys.items()],
                            token_file=self.token_path, tables={"limits": {"hold_s": 10.0}})

    def start_gateway(self, keys: dict[str, str], preferred_port: int | None = None) -> Daemon:
        """Start the gateway process (stopped by :meth:`stop`); its URL is ``gateway_url``."""
        self.gateway_port = pick_port(preferred_port) if preferred_port else free_port()
        self.gateway = Daemon("llm_ops_helper.controller.gateway", "gateway", self.workdir,
                              self.gateway_toml(self.gateway_port, keys))
        self._start(self.gateway)
        return self.gateway

    def _start(self, daemon: Daemon) -> None:
        daemon.start(self.env, self.parent_death)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

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
        self.broker = LocalMosquitto(self.workdir / "mosquitto", env=self.env,
                                     parent_death=self.parent_death)
        await self.broker.start()
        self.http_port = (pick_port(self.preferred_http_port) if self.preferred_http_port
                          else free_port())
        self.controller = Daemon("llm_ops_helper.controller", "controller", self.workdir,
                                 self.controller_toml())
        self._start(self.controller)
        for _ in range(self.agents_count):
            self._start(self.add_agent().daemon)
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
            for agent in self.agents:
                if agent.daemon.process is not None and not agent.daemon.running:
                    raise RuntimeError(f"agent {agent.host} exited: "
                                       f"{agent.daemon.log()[-2000:]}")
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

    def daemons(self) -> list[Daemon]:
        """Every daemon started so far: agents first (they start replicas), then the rest."""
        found = [a.daemon for a in self.agents]
        return found + [d for d in (self.gateway, self.controller) if d is not None]

    async def stop(self, daemon_timeout_s: float = 15.0) -> None:
        """The gateway, then every agent at once (they stop their replicas), any replica group
        still named, the controller, and the broker last, even when cancelled part-way. Each
        daemon gets ``daemon_timeout_s`` after SIGTERM, then SIGKILL."""
        try:
            if self.gateway is not None:
                with contextlib.suppress(Exception):
                    await self.gateway.stop(daemon_timeout_s)
            await asyncio.gather(*(a.daemon.stop(daemon_timeout_s) for a in self.agents),
                                 return_exceptions=True)
            for agent in self.agents:
                for pgid in agent.replica_groups().values():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
            if self.controller is not None:
                with contextlib.suppress(Exception):
                    await self.controller.stop(daemon_timeout_s)
        finally:
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


