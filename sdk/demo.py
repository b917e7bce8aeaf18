"""``llmops demo``: a private Mosquitto and one agent with simulated GPUs, telemetry printed.

Later issues grow this into the whole fleet (controller, gateway, several agents, load).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from llm_ops_helper.broker import BrokerUnavailable, LocalMosquitto
from llm_ops_helper.watch import watch


def _agent_toml(broker: LocalMosquitto, gpus: int, interval_s: float, scenario: Path,
                state_dir: Path) -> str:
    return (f'host = "demo-gpu-01"\n'
            f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\nkeepalive_s = 10\n'
            f'[telemetry]\ninterval_s = {interval_s}\n'
            f'[gpus]\nbackend = "auto"\nsimulated_count = {gpus}\nscenario = "{scenario}"\n'
            f'[supervisor]\nstate_dir = "{state_dir}"\n'
            f'bind_host = "127.0.0.1"\nstop_replicas_on_exit = true\n')


async def run_demo(*, gpus: int, interval_s: float, duration_s: float | None,
                   scenario: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="llmops-demo-") as tmp:
        work = Path(tmp)
        scenario_path = Path(scenario) if scenario else work / "scenario.toml"
        if scenario is None:
            shipped = resources.files("llm_ops_helper.systemd") / "scenario.example.toml"
            scenario_path.write_text(shipped.read_text())
        try:
            broker = LocalMosquitto(work / "mosquitto")
            await broker.start()
        except BrokerUnavailable as exc:
            print(f"llmops demo: {exc}", file=sys.stderr)
            return 69
        config = work / "agent.toml"
        config.write_text(_agent_toml(broker, gpus, interval_s, scenario_path,
                                       work / "agent-state"))
        agent_log = work / "agent.log"
        print(f"broker   mosquitto on {broker.host}:{broker.port}")
        print(f"agent    {gpus} simulated GPUs (NVML is used instead where a driver is present), "
              f"scenario {scenario_path.name}; JSON logs in {agent_log}")
        print("watching llmops/v1/# — Ctrl-C to stop\n", flush=True)
        with agent_log.open("wb") as log:
            agent = subprocess.Popen([sys.executable, "-m", "llm_ops_helper.agent",
                                      "--config", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     # Ctrl-C reaches only us; we stop the agent ourselves.
                                     start_new_session=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if duration_s is not None:
            loop.call_later(duration_s, stop.set)
        try:
            await watch(broker.host, broker.port, stop=stop)
        finally:
            agent.send_signal(signal.SIGTERM)
            await asyncio.to_thread(agent.wait, 10)
            await broker.stop()
        print(f"\nagent exited with {agent.returncode}; broker stopped")
        return 0 if agent.returncode == 0 else 1
