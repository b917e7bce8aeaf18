"""Start-up: turn a config into collectors, a command verifier and an :class:`Agent`.

Everything here runs once, before the main loop; a problem is a :class:`ConfigError` (exit 78).
"""

from __future__ import annotations

import structlog

from llm_ops_helper.agent.collectors.base import Collector, GpuCollector
from llm_ops_helper.agent.collectors.host import HostCollector
from llm_ops_helper.agent.collectors.metric_map import mappings
from llm_ops_helper.agent.collectors.nvml import NvmlCollector, NvmlUnavailable
from llm_ops_helper.agent.collectors.runtime import RuntimeCollector, ScrapeTarget
from llm_ops_helper.agent.collectors.scenario import ScenarioError, load_scenario
from llm_ops_helper.agent.collectors.simulated import PROFILES, SimulatedGpuCollector
from llm_ops_helper.agent.commands import ReloadingVerifier
from llm_ops_helper.agent.config import AgentConfig, ConfigError
from llm_ops_helper.agent.daemon import Agent
from llm_ops_helper.agent.replicas.supervisor import Supervisor, SupervisorError
from llm_ops_helper.keys import KeyFiles, KeyStoreError
from llm_ops_helper.systemd_notify import Notifier

log = structlog.get_logger("llmops.agent")


def build_gpus(config: AgentConfig) -> GpuCollector | None:
    gpus = config.gpus
    if gpus.backend == "none":
        return None
    if gpus.backend in ("auto", "nvml"):
        try:
            return NvmlCollector.open(config.hostname)
        except NvmlUnavailable as exc:
            if gpus.backend == "nvml":
                raise ConfigError(f"{config.source}: key 'gpus.backend': 'nvml' was asked for "
                                  f"but {exc}; use 'auto' or 'simulated' on hosts without "
                                  "NVIDIA GPUs") from None
            log.info("nvml_unavailable", reason=str(exc), fallback="simulated")
    if gpus.simulated_profile not in PROFILES:
        raise ConfigError(f"{config.source}: key 'gpus.simulated_profile': "
                          f"{gpus.simulated_profile!r} is not one of {', '.join(sorted(PROFILES))}")
    try:
        scenario = load_scenario(config.resolve(gpus.scenario)) if gpus.scenario else None
        return SimulatedGpuCollector(config.hostname, count=gpus.simulated_count,
                                     profile=gpus.simulated_profile, scenario=scenario)
    except ScenarioError as exc:
        raise ConfigError(f"{config.source}: key 'gpus.scenario': {exc}") from None


def build_verifier(config: AgentConfig) -> ReloadingVerifier:
    """The keys in commands.keys and commands.keys_dir, read now (a problem is fatal) and again
    whenever their files change."""
    commands = config.commands
    directory = config.resolve(commands.keys_dir) if commands.keys_dir else None
    if directory is not None and not directory.is_dir():
        raise ConfigError(f"{config.source}: key 'commands.keys_dir': no such directory "
                          f"{commands.keys_dir!r}")
    for i, key in enumerate(commands.keys):
        config.read_secret(key.file, f"commands.keys[{i}].file")  # unreadable: fail now
    files = KeyFiles({key.id: config.resolve(key.file) for key in commands.keys}, directory)
    try:
        keys, _ = files.load(strict=True)
    except KeyStoreError as exc:
        raise ConfigError(f"{config.source}: key 'commands.keys_dir': {exc}") from None
    if keys:
        log.info("command_keys_loaded", key_ids=sorted(keys))
    else:
        log.warning("commands_disabled", reason="no commands.keys or commands.keys_dir key yet; "
                    "commands are refused with unknown_key until one is installed")
    return ReloadingVerifier(files, keys, max_lifetime_s=commands.max_lifetime_s,
                             clock_skew_s=commands.clock_skew_s)


def build_supervisor(config: AgentConfig, gpus: GpuCollector | None) -> Supervisor:
    # Imported here: the adapters' module table is only needed once a supervisor is built.
    from llm_ops_helper.agent.runtimes.registry import RUNTIMES

    supervisor = Supervisor(config.supervisor, host=config.hostname, runtimes=RUNTIMES,
                            inventory=lambda: gpus.inventory() if gpus is not None else [],
                            # Simulated GPUs (explicit, or "auto" without NVML) have made-up
                            # UUIDs: replicas get indices, never those.
                            gpu_uuids=isinstance(gpus, NvmlCollector))
    try:
        supervisor.prepare()
    except SupervisorError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None
    return supervisor


def build_agent(config: AgentConfig) -> Agent:
    from llm_ops_helper.agent.runtimes.registry import available_runtimes, unavailable_reasons

    formats = sorted(mappings())
    for i, replica in enumerate(config.replicas):
        if replica.runtime not in formats:
            raise ConfigError(f"{config.source}: key 'replicas[{i}].runtime': "
                              f"{replica.runtime!r} is not one of {', '.join(formats)}")
    verifier = build_verifier(config)
    password = (config.read_secret(config.broker.password_file, "broker.password_file").decode()
                if config.broker.password_file else None)
    gpus = build_gpus(config)
    collectors: list[Collector] = []
    if gpus is not None:
        collectors.append(gpus)
    if config.host_metrics.enabled:
        try:
            collectors.append(HostCollector(config.host_metrics.disk_path))
        except FileNotFoundError:
            raise ConfigError(f"{config.source}: key 'host_metrics.disk_path': no such path "
                              f"{config.host_metrics.disk_path!r}") from None
    supervisor = build_supervisor(config, gpus)
    if isinstance(gpus, SimulatedGpuCollector):
        gpus.memory_in_use = supervisor.gpu_memory_in_use
    configured = [ScrapeTarget(r.name, r.runtime, r.metrics_url) for r in config.replicas]
    collectors.append(RuntimeCollector(lambda: [*configured, *supervisor.targets()],
                                       timeout_s=config.collector_timeout_s * 0.9))
    runtimes = available_runtimes()
    log.info("runtimes_available", available=runtimes, unavailable=unavailable_reasons())
    return Agent(config, collectors, gpus=gpus, verifier=verifier, runtimes=runtimes,
                 notifier=Notifier(), broker_password=password, supervisor=supervisor)
